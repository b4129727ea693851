"""Golden results: the pruned weights of every method × pattern × allocation × refiner combination on tiny models,
and of the CLI's run modes (--stream, --offload-dir, --sequential, resume after SIGKILL), are bit-identical to
those recorded before the pipeline rebuild (``tests/golden/hashes.json``, written by ``tests/golden_cases.py``);
on ``smollm2-135m`` four runs at one thread are bit-identical too (``tests/golden/smollm2.json``)."""

import json
import os

import pytest
import torch

import golden_cases as g
from conftest import DATA_DIR


def _recorded(path):
    if not path.is_file():
        pytest.skip(f"{path.name} not recorded")
    data = json.loads(path.read_text())
    if data["environment"] != g.environment_key():
        pytest.skip(f"golden hashes were taken on {data['environment']}, this is {g.environment_key()}: "
                    "float reduction order differs; regenerate with python tests/golden_cases.py")
    return data["hashes"]


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_combination_on_tiny_models(one_thread, tokenizer, tmp_path):
    hashes = _recorded(g.GOLDEN)
    calib = g.calib_text(tmp_path)
    cases = g.in_memory_cases()
    assert {c for c, _, _ in cases} | set(g.CLI_CASES) == set(hashes)
    wrong = {}
    for case, family, fields in cases:
        got = g.run_in_memory(family, fields, tokenizer, calib)
        if got != hashes[case]:
            wrong[case] = got
    assert not wrong, f"{len(wrong)} of {len(cases)} cases changed, e.g. {sorted(wrong)[:5]}"


@pytest.mark.parametrize("case", list(g.CLI_CASES))
def test_cli_run_modes(case, tokenizer, tmp_path):
    hashes = _recorded(g.GOLDEN)
    model_dir = g.deep_llama(tmp_path, tokenizer)
    calib = g.calib_text(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    assert g.run_cli(case, model_dir, calib, work) == hashes[case]


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LMPRUNE_GOLDEN_REAL") != "1", reason="set LMPRUNE_GOLDEN_REAL=1 (about 10 min)")
@pytest.mark.parametrize("case", list(g.REAL_CASES))
def test_smollm2_bit_identical(case, tmp_path):
    pytest.importorskip("gguf")
    hashes = _recorded(g.REAL_GOLDEN)
    assert g.run_real(case, DATA_DIR, tmp_path) == hashes[case]
