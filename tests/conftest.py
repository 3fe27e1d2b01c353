import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads stall a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory):
    """A small simulated screen (additive split: 15 train, 1 val, 2 test keys; 225 controls) and a tiny
    generator pretrained on it, shared by the evaluate and rl tests."""
    import data
    import evaluate
    import flow
    tmp = tmp_path_factory.mktemp("screen")
    path = tmp / "sim.h5ad"
    data.write_h5ad(path, data.simulate(n_cells=1500, n_genes=200, n_singles=10, n_combos=8, seed=0))
    ckpt = flow.train(flow.FlowConfig(data=str(path), n_genes=0, steps=60, width=64, depth=1, batch_size=64,
                                      out=str(tmp / "flow.pt"), progress=False, eval_every=1000, save_every=1000,
                                      fit_trust=False))
    model, ck = flow.load_checkpoint(ckpt)
    return {"tmp": tmp, "path": path, "ckpt": ckpt, "model": model, "ds": evaluate.dataset_for(ck)}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (multi-process, > 10 s)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than ~10 s; skipped unless pytest --runslow")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow"):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
