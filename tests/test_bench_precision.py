import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_precision.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_precision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_precision_times_both_precisions_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--batches", "2", "--batch-size", "8", "--rounds", "2", "--hidden-size", "16", "--channels", "8", "--cells", "4"]
    assert bench().main([*args, "--vocab-size", "50", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [len(result["seconds_per_step"][name]) for name in ("float32", "bfloat16")] == [2, 2]
    assert all(t > 0 for times in result["seconds_per_step"].values() for t in times)
    assert result["bfloat16_speedup"] > 0


@pytest.mark.parametrize("bad", [["--cells", "10"], ["--batches", "0"], ["--rounds", "0"], ["--vocab-size", "3"]])
def test_bench_precision_refuses_bad_sizes_in_one_line(bad, capsys):
    with pytest.raises(SystemExit) as exit:
        bench().main(bad)
    assert exit.value.code == 2
    assert ": error: --" in capsys.readouterr().err.strip().splitlines()[-1]
