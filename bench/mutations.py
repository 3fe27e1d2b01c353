"""Mutation check: does the test suite catch deliberate one-line bugs in the method?

    python bench/mutations.py                 # each mutation against the tests that should catch it (~15 min)
    python bench/mutations.py --full          # each mutation against the whole suite (~25 x 3 min)
    python bench/mutations.py --only 1,4 -v   # some of them, with pytest's output
    python bench/mutations.py --list          # the mutations, without running anything

Every mutation is (file, exact old text, new text, what it breaks, test targets). For each, the repository (its files,
not .git or runs/) is copied to a temporary directory, the old text, which must occur exactly once, is replaced, and
pytest runs there on the targets (test files or node ids; --full: the whole suite) with its own cache directory, as in
a fresh clone (no ../shared beside it). A mutation is caught when a test fails that passes on the unmutated copy. The
script stops, before running anything, when an old text is missing or ambiguous: the code changed, so the list must be
updated with it (a refactor must keep every bug expressible). It prints a markdown table and exits 1 if any mutation
survived. Not part of the default test run (it takes minutes); README, "Set-up", names it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", "runs", "__pycache__", ".pytest_cache", "venv", ".venv", "cache"}


@dataclass
class Mutation:
    file: str
    old: str
    new: str
    what: str
    targets: tuple


M = Mutation
MUTATIONS = [
    # the four bugs issue 21 found surviving the suite
    M("rl.py", "adv = rearrange(group_advantages(", "adv = -rearrange(group_advantages(",
      "rl.train: advantages negated (GRPO climbs downhill)", ("tests/test_rl.py",)),
    M("rl.py", "mean_ref, _ = flow.sde_mean_std(run.frozen, ", "mean_ref, _ = flow.sde_mean_std(run.policy, ",
      "rl.train: KL reference mean from the policy, not the frozen model", ("tests/test_rl.py",)),
    M("flow.py", "(r.pow(2).sum(1) - noise).clamp_min(0)", "r.pow(2).sum(1).clamp_min(0)",
      "fit_residual_trust without its tr(S)/n debiasing", ("tests/test_flow.py",)),
    M("flow.py", "(r.pow(2).sum(1) - noise).clamp_min(0)", "(r.pow(2).sum(1) + noise).clamp_min(0)",
      "fit_residual_trust with the debiasing's sign flipped", ("tests/test_flow.py",)),
    M("flow.py", "min(lam, K / (K + 1))", "lam", "fit_residual_trust: one key can give full trust", ("tests/test_flow.py",)),
    M("flow.py", "torch.tensor(n) * repeat)  # (sum n * repeat,)", "torch.tensor(n) * repeat).roll(1)  # (sum n * repeat,)",
      "flow.generate: key ids rolled against the control rows", ("tests/test_evaluate.py", "tests/test_bestofn.py")),
    M("flow.py", "    table, draw = ds.key_table(keys), ", "    table, draw = ds.key_table(keys[::-1]), ",
      "flow.generate: the key table in the wrong order", ("tests/test_evaluate.py", "tests/test_bestofn.py")),
    # GRPO
    M("rl.py", "loss = surrogate + beta * kl.sum() / len(logp)", "loss = surrogate - beta * kl.sum() / len(logp)",
      "grpo_loss: KL sign flipped", ("tests/test_rl.py",)),
    M("rl.py", "ratio.clamp(1 - clip, 1 + clip) * adv", "ratio * adv", "grpo_loss: PPO clip dropped", ("tests/test_rl.py",)),
    M("rl.py", "dev = r - r.mean(-1, keepdim=True)", "dev = r - r.mean()",
      "group_advantages: the mean over all groups, not within each context", ("tests/test_rl.py",)),
    M("rl.py", "dev = r - r.mean(-1, keepdim=True)", "dev = r - r.mean((1, 2), keepdim=True)",
      "group_advantages: centred on the group, not on each context", ("tests/test_rl.py",)),
    M("rl.py", "return float(s.mean()), t, t > t_min and", "return float(s.mean()), t, True and",
      "judge: a step kept without a gain beyond the noise", ("tests/test_rl.py",)),
    M("rl.py", "all(sign * diff[k].mean() >= -noise[k]", "all(sign * diff[k].mean() >= -1e9",
      "judge: the guards ignored", ("tests/test_rl.py",)),
    M("rl.py", "return model.decode(cond[\"ctrl\"] + z), xs, logp", "return model.decode(z), xs, logp",
      "rollout: the change decoded without its control cell", ("tests/test_rl.py",)),
    M("rl.py", "weight=len(mine) * world / n_groups", "weight=1.0",
      "rl.train under torchrun: each process's loss not weighted by its share of the groups",
      ("tests/test_scale.py::test_rl_two_processes_equal_one",)),
    # the sampler and the generator
    M("flow.py", "* torch.sqrt((1 - tt).clamp(min=0) / t_eff) * math.sqrt(h)", "* torch.sqrt((1 - tt).clamp(min=0) / t_eff) * h",
      "sde_mean_std: noise scale h instead of sqrt(h)", ("tests/test_flow.py",)),
    M("flow.py", "return [i / steps for i in range(steps)], 1.0 / steps", "return [(i + 1) / steps for i in range(steps)], 1.0 / steps",
      "time_grid: off by one step", ("tests/test_flow.py",)),
    M("flow.py", "return (1 - t) * x0 + t * x1, x1 - x0", "return t * x0 + (1 - t) * x1, x1 - x0",
      "interpolant: the path runs backwards", ("tests/test_flow.py",)),
    M("flow.py", "z = x[:B] - x[B:] if paired else x", "z = x[B:] - x[:B] if paired else x",
      "paired generation: the change's sign flipped", ("tests/test_flow.py", "tests/test_evaluate.py")),
    M("flow.py", "\"mu0\": cond[\"mu0\"] - cond[\"start\"]}", "\"mu0\": cond[\"mu0\"]}",
      "with_twins: the control path keeps the key's shift", ("tests/test_flow.py", "tests/test_evaluate.py")),
    M("flow.py", "float(np.clip(min(lam, K / (K + 1)), 0, 1))", "float(np.clip(min(lam, K / (K + 1)), -1, 1))",
      "fit_residual_trust: a negative trust is not clipped to 0", ("tests/test_flow.py",)),
    M("flow.py", "a[rank::world] for a in data.draw_batch(", "a[0::world] for a in data.draw_batch(",
      "flow.train under torchrun: every process trains on rank 0's rows",
      ("tests/test_scale.py::test_flow_two_processes_equal_one",)),
    M("data.py", "own = np.concatenate([own_rows[k][1] + 1 - own_rows[k][0]", "own = np.concatenate([own_rows[k][1] + own_rows[k][0]",
      "training_rows: a cell trained with the prior of its own fold (leakage)", ("tests/test_flow.py", "tests/test_data.py")),
    # the prior, its trust and the dataset
    M("data.py", "for p in s.split(\"+\")}) < 2:", "for p in [s]}) < 2:",
      "read_doses: GEARS' dose_val ('1' / '1+1') taken for a dose", ("tests/test_layouts.py",)),
    M("data.py", "(self.novel(key) or self.prior_kind(key) not in kinds)", "(self.novel(key) and self.prior_kind(key) not in kinds)",
      "Dataset.unvalidated: a prior kind no validation key has is treated as validated", ("tests/test_data.py",)),
    M("data.py", "skip = own[0][1] if len(own) == 1 and own[0][0] == name and cov == key[1] else \"-\"", "skip = \"-\"",
      "component_deltas: a training single's prior contains itself", ("tests/test_data.py",)),
    M("data.py", "out.update({kind: 1.0 for kind in self.untrained_kinds()})", "out.update({kind: 0.0 for kind in self.untrained_kinds()})",
      "prior_trust: a prior kind with no evidence gets 0, not the plain prior", ("tests/test_data.py",)),
    M("data.py", "else trust[\"mean\"] * self.mean_delta(key)).astype", "else 0 * self.mean_delta(key)).astype",
      "Dataset.start: no fallback to the trusted training-mean delta", ("tests/test_data.py", "tests/test_bestofn.py")),
    M("data.py", "return out[0] if isinstance(idx, (int, np.integer)) else out", "return out[0] if isinstance(idx, (int, np.integer)) else out[::-1]",
      "SparseRows: rows read from the CSR matrix in the wrong order", ("tests/test_scale.py", "tests/test_data.py")),
    # rewards and evaluation
    M("verifiers.py", "ac = a - a.mean(-1, keepdim=True)  # (R, D)", "ac = a  # (R, D)",
      "pearson reward: rows not centred (cosine, not Pearson)", ("tests/test_verifiers.py",)),
    M("verifiers.py", "return -(m_xy - m_xx) - m_xx.mean() / 2", "return (m_xy - m_xx) - m_xx.mean() / 2",
      "energy_witness: sign flipped", ("tests/test_verifiers.py",)),
    M("evaluate.py", "cells = np.maximum(ctrl[:max_cells] + shift, 0)", "cells = np.maximum(ctrl[:max_cells] - shift, 0)",
      "pseudo_reference: shifted the wrong way", ("tests/test_bestofn.py",)),
    M("evaluate.py", "score.reshape(-1, N).argmax(1)]", "score.reshape(-1, N).argmin(1)]",
      "best_of_n: keeps the worst candidate", ("tests/test_bestofn.py",)),
    M("evaluate.py", "ref = pseudo_reference(ds, k, trust, n_de, std_floor)", "ref = pseudo_reference(ds, keys[0], trust, n_de, std_floor)",
      "best_of_n: every key selected against the first key's pseudo-reference", ("tests/test_bestofn.py",)),
]


def copy_repo(dst: Path) -> None:
    shutil.copytree(ROOT, dst, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith((".pt", ".pyc"))])


def check(mutations) -> None:
    """Every old text occurs exactly once in its file: otherwise stop before running anything."""
    bad = []
    for i, m in enumerate(mutations, 1):
        n = (ROOT / m.file).read_text().count(m.old)
        if n != 1:
            bad.append(f"mutation {i} ({m.what}): {m.file} holds its old text {n} times, not once: {m.old!r}")
    if bad:
        sys.exit("error: the code changed under these mutations; update MUTATIONS in bench/mutations.py:\n  "
                 + "\n  ".join(bad))


def pytest(repo: Path, targets, verbose: bool, timeout: int) -> tuple[set, str, float]:
    """Run pytest in `repo` on `targets`: (the failing and erroring node ids, the output, seconds)."""
    env = {**os.environ, "PERTURBCELLRL_CACHE": str(repo.parent / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *targets]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = f"{e.stdout or ''}\nTIMEOUT after {timeout} s"
        return {"(timeout)"}, out, time.time() - t0
    if verbose:
        print(out[-4000:])
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M))
    if p.returncode not in (0, 1) and not failed:                     # collection errors, crashes, no tests
        failed = {f"(pytest exit {p.returncode})"}
    return failed, out, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="run the whole suite for every mutation")
    ap.add_argument("--only", help="comma-separated mutation numbers (1-based), e.g. 1,4")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    a = ap.parse_args(argv)
    picked = [int(i) for i in a.only.split(",")] if a.only else range(1, len(MUTATIONS) + 1)
    chosen = [(i, MUTATIONS[i - 1]) for i in picked]
    check([m for _, m in chosen])
    if a.list:
        for i, m in chosen:
            print(f"{i:3d}  {m.file:12s} {m.what}  [{', '.join(m.targets)}]")
        return 0
    rows, survived = [], 0
    with tempfile.TemporaryDirectory(prefix="mutations_") as tmp:
        base = Path(tmp) / "clean" / "repo"
        copy_repo(base)
        targets = ["tests"] if a.full else sorted({t for _, m in chosen for t in m.targets})
        targets = [t for t in targets if t.split("::")[0] == t or t.split("::")[0] not in targets]  # no test twice
        print(f"baseline: {' '.join(targets)} on the unmutated copy ...", flush=True)
        base_failed, out, dt = pytest(base, targets, a.verbose, timeout=a.timeout * 3)
        print(f"  {len(base_failed)} failing at baseline ({dt:.0f} s)" + (": " + ", ".join(sorted(base_failed))
                                                                          if base_failed else ""), flush=True)
        for i, m in chosen:
            repo = Path(tmp) / f"m{i}" / "repo"
            copy_repo(repo)
            path = repo / m.file
            path.write_text(path.read_text().replace(m.old, m.new))
            failed, out, dt = pytest(repo, ["tests"] if a.full else list(m.targets), a.verbose, a.timeout)
            caught = sorted(failed - base_failed)
            survived += not caught
            rows.append((i, m, caught, dt))
            print(f"{i:3d} {'caught' if caught else 'SURVIVED'} ({dt:.0f} s) {m.what}" +
                  (f": {', '.join(caught[:4])}" + (" ..." if len(caught) > 4 else "") if caught else ""), flush=True)
            shutil.rmtree(repo.parent, ignore_errors=True)
    print("\n| # | file | mutation | caught by |\n|---|---|---|---|")
    for i, m, caught, _ in rows:
        by = "; ".join(c.split("::", 1)[-1] if "::" in c else c for c in caught) if caught else "**SURVIVED**"
        print(f"| {i} | {m.file} | {m.what} | {by} |")
    print(f"\n{len(rows) - survived} of {len(rows)} caught" + (f"; {survived} SURVIVED" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
