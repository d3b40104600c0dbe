"""Export a model for a runtime: ONNX (torch.onnx's dynamo exporter) and a torch.export program.

    python tools/export.py local-dir:dat_pp_tiny_hub --out export/            # batch 1
    python tools/export.py dat_pp_tiny_hub --out export/ --batch 8 --dynamic-batch
    python tools/export.py --model vit_small_patch16_224 --out export/        # random weights

WEIGHTS is a hub-style folder (``DIR`` or ``local-dir:DIR``, as tools/convert_checkpoint.py
--hub writes it from a checkpoint): the model its config.json describes (``architecture``,
``model_args``) with its weights, loaded strictly. ``--model NAME`` exports NAME with its
registered defaults and fresh weights instead (is this architecture exportable?).

OUT/model.onnx runs in onnxruntime (``session.run(None, {"image": x})``), OUT/model.pt2 in
PyTorch without the model's code (``torch.export.load(...).module()(x)``). The input is a float32
batch of the model's ``pretrained_cfg['input_size']``; the output its eval-mode logits (a distilled
ViT: the mean of its two heads). ``--batch N`` is the example batch; with ``--dynamic-batch`` any
batch runs, otherwise only N. A model that cannot be exported is one line naming the format and
the exporter's reason (exit 2).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from errors import UserError, one_line, run_tool  # noqa: E402

FORMATS = ("onnx", "pt2")


def load_model(weights: str, name: str) -> torch.nn.Module:
    """The model a hub-style folder describes, its weights loaded strictly; or ``name`` with its
    registered defaults."""
    import models
    from models.weights import WeightsError, load_weights, read_weights, resolve
    try:
        if not weights:
            return models.create_model(name)
        source = resolve(weights)
        arch, args = source.config.get("architecture"), source.config.get("model_args") or {}
        if not arch:
            raise UserError(f"{weights}: a hub-style folder with a config.json naming its architecture is needed "
                            f"(tools/convert_checkpoint.py CKPT --hub DIR writes one)")
        model = models.create_model(arch, **args)
        load_weights(model, read_weights(weights), weights)
        return model
    except (models.UnknownModelError, models.ModelArgumentError, WeightsError) as e:
        raise UserError(one_line(e, 300)) from None


def example_input(model: torch.nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


def dynamic_shapes(dynamic_batch: bool) -> Optional[tuple]:
    """torch.export's spec for the one input: the batch dimension free, or everything fixed."""
    return ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None


def export(model: torch.nn.Module, out: str, batch: int = 1, dynamic_batch: bool = False,
           formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Write ``out/model.pt2`` (torch.export) and/or ``out/model.onnx`` (that program through
    torch.onnx's dynamo exporter) of ``model`` in eval mode; returns the files written. What an
    exporter refuses is a UserError naming it and why."""
    model = model.eval()
    x, shapes = example_input(model, batch), dynamic_shapes(dynamic_batch)
    arch = model.pretrained_cfg.get("architecture", type(model).__name__)
    written: list[str] = []
    try:  # one torch.export program: the .pt2 file, and what the ONNX exporter translates
        with torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    except Exception as e:  # the exporter's errors have no common base class
        raise UserError(f"{arch} cannot be exported (torch.export): {type(e).__name__}: {one_line(e, 300)}") from None
    os.makedirs(out, exist_ok=True)  # after the export: a refused model leaves nothing
    if "pt2" in formats:
        written.append(os.path.join(out, "model.pt2"))
        torch.export.save(program, written[-1])
    if "onnx" in formats:
        try:
            onnx_program = torch.onnx.export(program, (x,), dynamo=True, input_names=["image"],
                                             output_names=["logits"], verbose=False)
        except ImportError as e:  # torch.onnx's exporter needs onnx and onnxscript
            raise UserError(f"onnx: {one_line(e, 200)} (pip install -c constraints.txt -r requirements-test.txt)") from None
        except Exception as e:
            raise UserError(f"{arch} cannot be exported to ONNX: {type(e).__name__}: {one_line(e, 300)}") from None
        written.append(os.path.join(out, "model.onnx"))
        onnx_program.save(written[-1])
    return written


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="?", default="", help="hub-style folder (DIR or local-dir:DIR)")
    p.add_argument("--model", default="", help="instead of WEIGHTS: a registered name, its defaults, fresh weights")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for model.onnx and model.pt2")
    p.add_argument("--batch", type=int, default=1, help="the example batch (the only one without --dynamic-batch)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size runs")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    args = p.parse_args(argv)
    if bool(args.weights) == bool(args.model):
        raise UserError("give WEIGHTS (a hub-style folder) or --model NAME, one of them")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be at least 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file: name a folder (new or existing)")
    model = load_model(args.weights, args.model)
    for path in export(model, args.out, args.batch, args.dynamic_batch, tuple(args.formats)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_tool(main)
