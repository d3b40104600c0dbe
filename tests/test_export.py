"""tools/export.py: a tiny model of every family exported from its hub folder to ONNX (run in
onnxruntime, the optional test dependency make test installs) and to a torch.export program,
each with PyTorch's logits; what cannot be exported is one line. The ONNX exporter takes
seconds per model: the full matrix (fixed and dynamic batch) runs for the ViT, the fixed batch
for the other families, marked slow (docs/TESTING.md)."""
from __future__ import annotations

import pytest
import torch
from timm.models import save_for_hf

import models
from errors import UserError
from tools import export as export_tool

from tests.conftest import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

try:
    import onnxruntime
except ImportError:  # an optional test dependency (requirements-test.txt): make test installs it
    onnxruntime = None


# (family, dynamic batch): both for the ViT, the fixed batch (slow) for the others.
CASES = [pytest.param(family, dynamic, id=f"{family}-{'dynamic' if dynamic else 'fixed'}",
                      marks=() if family == "vit" else (pytest.mark.slow,))
         for family in FAMILIES for dynamic in ((False, True) if family == "vit" else (False,))]


@pytest.mark.skipif(onnxruntime is None, reason="onnxruntime is not installed (make test installs "
                                                "requirements-test.txt)")
@pytest.mark.parametrize("family, dynamic", CASES)
def test_every_family_exports_to_onnx_and_torch_export_with_pytorchs_logits(family, dynamic, tmp_path, capsys):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = models.create_model(name, **kwargs).eval()
    folder, out = tmp_path / "hub", tmp_path / "export"
    save_for_hf(model, folder, model_args=kwargs, safe_serialization=True)
    args = ["--batch", "2", *(["--dynamic-batch"] if dynamic else [])]
    assert export_tool.main([f"local-dir:{folder}", "--out", str(out), *args]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(out / "model.pt2"), "wrote", str(out / "model.onnx")]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(out / "model.pt2")).module()
    for batch in (1, 3) if dynamic else (2,):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-6)
        logits = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-6)


class DataDependent(torch.nn.Module):
    """A forward that branches on a tensor's value: torch.export cannot trace it."""

    pretrained_cfg = {"architecture": "data_dependent", "input_size": (3, 4, 4)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_a_model_that_cannot_be_exported_is_one_line_naming_why(tmp_path):
    with pytest.raises(UserError) as refused:
        export_tool.export(DataDependent(), str(tmp_path), formats=("pt2",))
    message = str(refused.value)
    assert message.startswith("data_dependent cannot be exported (torch.export): ") and "\n" not in message
    assert not list(tmp_path.iterdir())
