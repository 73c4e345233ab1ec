"""The driver of prepare and re-embed checks its input before Ray starts without importing torch or
loading a model: only the actors do (torch alone took 1.2 s and the SFace load 1.5 s of the ~20 s to
the first committed shard on 2 CPUs)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"

_NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the driver imported torch")
sys.meta_path.insert(0, _NoTorch())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_TORCH + code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_prepare_checks_without_torch(tmp_path):
    r = _run(f"""
import jobs.prepare
from workers.pipeline import check_prepare
cfg, _ = jobs.prepare.parse_args(["--input", {str(SAMPLE)!r}, "--output", {str(tmp_path / "out")!r},
                                  "--select", "center", "--embed-precision", "bfloat16"])
checked = check_prepare(cfg)
print(checked.embedder_name, checked.embedding_dim, len(checked.inputs))
""")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:2] == ["sface", "128"] and int(r.stdout.split()[2]) > 0


def test_reembed_parses_and_checks_the_embedder_without_torch():
    r = _run("""
import jobs.reprocess
from workers.faces.weights import check_embedder
print(check_embedder("sface").version)
""")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("sface-")


def test_an_exported_embedder_is_still_loaded_whole(tmp_path):
    # A user's weights may be truncated: the check loads them (torch) and refuses them before any work.
    from workers.faces.embedders import SPEC_FILE, WEIGHTS_FILE, load_embedder, save_embedder
    from workers.faces.weights import check_embedder

    base = load_embedder("sface")
    save_embedder(base.module, base.spec, tmp_path / "ft")
    assert check_embedder(str(tmp_path / "ft")).embedding_dim == 128 and (tmp_path / "ft" / SPEC_FILE).is_file()
    weights = tmp_path / "ft" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(ValueError, match="cannot read weights"):
        check_embedder(str(tmp_path / "ft"))
