"""Pictures of the ViT research variants, as PNGs (matplotlib).

    python tools/visualize.py lai-mask --grid 8 8 --radius 2 --query 3 4 --out docs/images/lai_mask.png
    python tools/visualize.py lai-mask --schedule "[[0, 1], [10, 2], [40, null]]" --epoch 12 --out m.png
    python tools/visualize.py attention-map --model vit_dislai_tiny_patch4_32 --checkpoint ckpt.pth \\
        --image cat.png --layer 1 --head 0 --query 3 4 --out attn.png
    python tools/visualize.py deform-points --model vit_deform_tiny_patch4_32 --fit-digits 300 \\
        --arg depth=2 --query 3 4 --out docs/images/deform_points.png
    python tools/visualize.py dat-points --cfg configs/dat/dat_pp_tiny.yaml --checkpoint dat.pth \\
        --image cat.png --stage 2 --head 0 --query 7 7 --out dat_points.png

Without ``--image`` a held-out sklearn digit (upsampled) is used; without ``--checkpoint``,
``--fit-digits STEPS`` fits the model on digits first so a demo shows learned behaviour.
Each subcommand is one function; another model family can add its own subparser.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from errors import UserError, one_line, run_tool  # noqa: E402
from models.disentangled import DisentangledAttention  # noqa: E402
from models.locality import LAIAttention, locality_mask, parse_schedule, radius_at  # noqa: E402
from models.performer import PerformerAttention, log_features  # noqa: E402
from models.weights import adapt_weights, load_weights, read_weights, state_dict_of  # noqa: E402


# ----------------------------------------------------------------------------- lai-mask
def plot_lai_mask(args: argparse.Namespace) -> None:
    """The corrected 2-D window and the seed's 1-D band at one schedule point."""
    H, W = args.grid
    P = args.prefix
    if H < 1 or W < 1 or P < 0:
        raise UserError(f"--grid {H} {W} --prefix {P}: the grid needs a patch, the prefix >= 0 tokens")
    check_query(args.query, H, W)
    if args.radius is not None:
        r2 = r1 = args.radius
    else:
        r2 = radius_at(schedule_of(args.schedule, "--schedule", "2d"), args.epoch)
        r1 = radius_at(schedule_of(args.schedule_1d, "--schedule-1d", "1d"), args.epoch)
    N = P + H * W
    full = torch.ones(N, N, dtype=torch.bool)
    m2 = locality_mask((H, W), P, r2, "2d")
    m1 = locality_mask((H, W), P, r1, "1d")
    m2, m1 = (full if m is None else m for m in (m2, m1))
    qy, qx = args.query
    qi = P + qy * W + qx
    fig, axes = plt.subplots(2, 2, figsize=(9, 9))
    for col, (mask, title) in enumerate([(m2, f"corrected 2-D window, r={r2}"),
                                         (m1, f"faithful 1-D band, w={r1}")]):
        ax = axes[0, col]
        ax.imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
        ax.set_title(f"{title}\n(N x N, token 0 = CLS)")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax = axes[1, col]
        seen = mask[qi, P:].view(H, W).float().numpy()
        ax.imshow(seen, cmap="Blues", vmin=0, vmax=1.5, interpolation="nearest")
        ax.scatter([qx], [qy], marker="*", s=200, c="red")
        cls_note = "sees CLS" if mask[qi, :P].all() else "does not see CLS"
        ax.set_title(f"patches seen by patch ({qy}, {qx}); {cls_note}\n"
                     f"CLS sees {int(mask[0].sum()) - P} of {H * W} patches")
        ax.set_xticks(range(W))
        ax.set_yticks(range(H))
    fig.tight_layout()
    save(fig, args.out)


def schedule_of(text: str, flag: str, window: str):
    """A radius schedule given as YAML text (``[[0, 1], [10, null]]``); a bad one names ``flag``."""
    try:
        return parse_schedule(yaml.safe_load(text), window)
    except (yaml.YAMLError, ValueError, TypeError) as e:
        mark = getattr(e, "problem_mark", None)
        why = f"not YAML ({e.problem} at column {mark.column + 1})" if mark else one_line(e, 200)
        raise UserError(f"{flag} {text!r}: {why} (expected YAML such as "
                        f"'[[0, 1], [10, 2], [40, null]]': [start epoch, radius] pairs)") from None


def check_query(query: Optional[list[int]], H: int, W: int, where: str = "the") -> None:
    """--query Y X lies on the H x W grid."""
    if query is not None and not (0 <= query[0] < H and 0 <= query[1] < W):
        raise UserError(f"--query {query[0]} {query[1]} must lie in {where} {H}x{W} grid "
                        f"(0 <= Y < {H}, 0 <= X < {W})")


# ------------------------------------------------------------------------ model helpers
def parse_args_list(pairs: list[str]) -> dict:
    """``key=value`` pairs (values parsed as YAML) -> constructor overrides."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not _:
            raise UserError(f"--arg expects key=value, got {pair!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--arg {pair!r}: the value is not YAML ({one_line(e, 200)})") from None
    return out


def digits(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits in [-1, 1], upsampled (nearest) to img_size, 3 channels."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    x = F.interpolate(x, size=img_size, mode="nearest").expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(data.target)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, np.ndarray]:
    """The model (eval mode) and one image as (1, 3, S, S) input and (S, S, 3) for display.
    A checkpoint with a saved config (ours) builds the model it was trained as and normalises
    the image as its data were (as --eval does); --arg overrides either."""
    from config import saved_config
    from model_config import saved_model_args
    torch.manual_seed(args.seed)
    ckpt = read_weights(args.checkpoint) if args.checkpoint else {}
    saved = saved_config(ckpt.get("config"))
    if saved is not None and saved.MODEL.NAME != args.model:
        raise UserError(f"--model {args.model}: {args.checkpoint} holds a {saved.MODEL.NAME} (its saved config says so)")
    kwargs = saved_model_args(saved, args.checkpoint) if saved is not None else {}
    try:
        model = models.create_model(args.model, **{**kwargs, **parse_args_list(args.arg)})
    except (models.UnknownModelError, models.ModelArgumentError, ValueError, AssertionError) as e:
        raise UserError(f"--model {args.model}: {one_line(e, 300)}") from None
    size = model.patch_embed.img_size[0]
    data = saved.get("DATA", {}) if saved is not None else {}
    mean = torch.tensor(data.get("MEAN") or [0.5] * 3).view(1, 3, 1, 1)  # [-1, 1]: what the demo fit uses
    std = torch.tensor(data.get("STD") or [0.5] * 3).view(1, 3, 1, 1)
    if args.checkpoint:
        load_weights(model, state_dict_of(ckpt, args.checkpoint), args.checkpoint)
    elif args.fit_digits:
        fit_digits(model, size, args.fit_digits)
    if args.epoch is not None:
        model.set_progress(args.epoch, 0)
    model.eval()
    if args.image:
        img = plt.imread(args.image)[..., :3].astype(np.float32)
        img = img / 255.0 if img.max() > 1 else img
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    else:
        x = (digits(size)[0][-1:] + 1) / 2  # a digit the demo fit never saw
    shown = x[0].permute(1, 2, 0).numpy().clip(0, 1)
    return model, (x - mean) / std, shown


def fit_digits(model: torch.nn.Module, size: int, steps: int) -> None:
    """A quick demo fit (AdamW, batch 32) on all but the last 100 digits."""
    x, y = digits(size)
    x, y = x[:-100], y[:-100]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    per_epoch = len(y) // 32
    for step in range(steps):
        model.set_progress(step // per_epoch, step)
        idx = torch.randint(0, len(y), (32,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def check_layer(model: torch.nn.Module, layer: int) -> int:
    """--layer names one of the model's blocks."""
    if not 0 <= layer < len(model.blocks):
        raise UserError(f"--layer {layer} must lie in [0, {len(model.blocks)}): the model has {len(model.blocks)} blocks")
    return layer


def layer_input(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The (normalised) tokens entering ``blocks[layer].attn``: (1, N, C)."""
    captured = {}
    hook = model.blocks[layer].attn.register_forward_pre_hook(
        lambda module, inputs: captured.setdefault("x", inputs[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return captured["x"]


def attention_probs(attn: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(heads, N, N) attention weights of one layer for softmax-family kinds; the Performer's
    are its normalised random-feature kernel (what it actually uses)."""
    q, k, _ = attn.qkv_heads(tokens)
    if isinstance(attn, PerformerAttention) and type(attn) is PerformerAttention:
        w = attn.features
        phq = torch.exp(log_features(q, w, attn.feature_scale))
        phk = torch.exp(log_features(k, w, attn.feature_scale))
        kernel = phq @ phk.transpose(-1, -2)
        return (kernel / kernel.sum(-1, keepdim=True))[0]
    if not isinstance(attn, (DisentangledAttention, LAIAttention)) and type(attn) is not models.attention.Attention:
        raise UserError(f"attention-map supports softmax, lai, dis, dislai, performer; "
                         f"got {type(attn).__name__} (use deform-points for deformable)")
    logits = q @ k.transpose(-1, -2) * attn.scale
    if isinstance(attn, DisentangledAttention):
        logits = logits + attn.position_bias(q, k)
    window = attn.window_bias(q.device, q.dtype) if hasattr(attn, "window_bias") else None
    if window is not None:
        logits = logits + window
    return torch.softmax(logits, -1)[0]


def plot_attention_map(args: argparse.Namespace) -> None:
    """One query's attention over the patch grid, next to the image."""
    model, x, shown = build(args)
    attn = model.blocks[check_layer(model, args.layer)].attn
    H, W = attn.grid_size
    P = attn.num_prefix_tokens
    check_query(args.query, H, W, "the model's")
    if not 0 <= args.head < attn.num_heads:
        raise UserError(f"--head {args.head} must lie in [0, {attn.num_heads})")
    with torch.no_grad():
        probs = attention_probs(attn, layer_input(model, x, args.layer))
    if args.query is None:
        qi, label = 0, "CLS"
    else:
        qy, qx = args.query
        qi, label = P + qy * W + qx, f"patch ({qy}, {qx})"
    row = probs[args.head, qi]
    grid = row[P:].view(H, W).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    axes[0].imshow(shown, interpolation="nearest")
    axes[0].set_title("input")
    axes[1].imshow(shown, interpolation="nearest")
    S = shown.shape[0]
    heat = axes[1].imshow(grid, cmap="inferno", alpha=0.75, extent=(0, S, S, 0), interpolation="nearest")
    if args.query is not None:
        cell = S / W
        axes[1].scatter([(qx + 0.5) * cell], [(qy + 0.5) * cell], marker="*", s=200, c="cyan")
    cls_weight = f", on CLS {row[:P].sum():.2f}" if P else ""
    axes[1].set_title(f"{model.attn_kind}: layer {args.layer}, head {args.head}\nquery {label}{cls_weight}")
    fig.colorbar(heat, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save(fig, args.out)


def plot_deform_points(args: argparse.Namespace) -> None:
    """Sampling points (per head, size ~ weight) of chosen patch queries over the image."""
    model, x, shown = build(args)
    attn = model.blocks[check_layer(model, args.layer)].attn
    if not hasattr(attn, "sampling_locations"):
        raise UserError(f"{args.model} has no deformable attention")
    P, (H, W), K = attn.num_prefix_tokens, attn.grid_size, attn.num_points
    check_query(args.query, H, W, "the model's")
    tokens = layer_input(model, x, args.layer)
    with torch.no_grad():
        loc = attn.sampling_locations(tokens[:, P:])[0]  # (heads, Np, K, 2) in patches
        logits = attn.attention_weights(tokens[:, P:]).view(H * W, attn.num_heads, K + P)
        weights = torch.softmax(logits, -1).transpose(0, 1)  # (heads, Np, K + P)
    queries = [tuple(args.query)] if args.query else [(H // 4, W // 4), (H // 2, W // 2), (3 * H // 4, 3 * W // 4)]
    S = shown.shape[0]
    cell = S / W
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(shown, interpolation="nearest")
    colors = plt.cm.tab10(np.arange(attn.num_heads) % 10)
    for qy, qx in queries:
        qi = qy * W + qx
        ax.scatter([(qx + 0.5) * cell], [(qy + 0.5) * cell], marker="*", s=250, c="red", zorder=3)
        for head in range(attn.num_heads):
            pts = (loc[head, qi] + 0.5) * cell
            size = 400 * weights[head, qi, :K].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=size, color=colors[head], alpha=0.8,
                       edgecolors="white", label=f"head {head}" if (qy, qx) == queries[0] else None)
    ax.set_xlim(-0.5 * cell, S + 0.5 * cell)
    ax.set_ylim(S + 0.5 * cell, -0.5 * cell)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"deformable sampling points, layer {args.layer} (star: query; size: weight)")
    fig.tight_layout()
    save(fig, args.out)


# --------------------------------------------------------------------------- dat-points
def dat_input(cfg, image: str) -> tuple[torch.Tensor, np.ndarray]:
    """(1, 3, S, S) input normalised as the config says, and the (S, S, 3) picture in [0, 1];
    without ``image`` the last sklearn digit (the one the digits val split ends with)."""
    size = cfg.DATA.IMG_SIZE
    if image:
        img = plt.imread(image)[..., :3].astype(np.float32)
        img = torch.from_numpy(img / 255.0 if img.max() > 1 else img).permute(2, 0, 1)[None]
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    else:
        from sklearn.datasets import load_digits
        img = torch.tensor(load_digits().images[-1], dtype=torch.float32)[None, None] / 16.0
        img = F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False)
        img = img.expand(-1, 3, -1, -1)
    img = img.clamp(0, 1)
    mean = torch.tensor(cfg.DATA.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.DATA.STD).view(1, 3, 1, 1)
    return (img - mean) / std, img[0].permute(1, 2, 0).numpy()


def dat_points(args: argparse.Namespace) -> dict:
    """Deformed sampling points of one 'D' block of a DAT model, and one query's top keys.

    The positions are those the block's forward returned for this image; the weights are
    ``DeformableAttention.attention_probs`` of the block's actual input. Returns what was
    drawn: positions / references (Hk, Wk, 2) in (y, x) [-1, 1] units of the chosen group,
    points_px (Hk*Wk, 2) as (x, y) pixels, the query, top_keys and their weights.
    """
    from config import load_config
    from model_config import build_model
    from models.dat_attention import DeformableAttention

    # The dataset only matters for validation (imagenet would ask for a data path).
    cfg = load_config(args.cfg, ["DATA.DATASET", "fake", *args.opts])
    torch.manual_seed(args.seed)
    model = build_model(cfg).eval()
    if args.checkpoint:
        state = state_dict_of(read_weights(args.checkpoint), args.checkpoint)
        load_weights(model, adapt_weights(model, state, drop_head=False), args.checkpoint)
    if not 0 <= args.stage < len(model.stages):
        raise UserError(f"--stage {args.stage} must lie in [0, {len(model.stages)})")
    stage = model.stages[args.stage]
    kinds = ["D" if isinstance(a, DeformableAttention) else "-" for a in stage.attns]
    block = kinds.index("D") if args.block is None and "D" in kinds else args.block
    if block is None or not 0 <= block < len(kinds) or kinds[block] != "D":
        raise UserError(f"stage {args.stage} blocks {''.join(kinds)} ('D' = deformable): "
                         f"choose a deformable --block")
    attn = stage.attns[block]
    if not 0 <= args.head < attn.heads:
        raise UserError(f"--head must lie in [0, {attn.heads})")
    group = args.head // (attn.heads // attn.groups)

    x, shown = dat_input(cfg, args.image)
    captured = {}
    hook = attn.register_forward_pre_hook(lambda module, inputs: captured.setdefault("x", inputs[0]))
    with torch.no_grad():
        _, positions, references = model.forward_features_with_points(x)
    hook.remove()
    index = sum(len(s.attns) for s in model.stages[:args.stage]) + block
    pos, ref = positions[index][0, group], references[index][0, group]          # (Hk, Wk, 2)
    H, W = captured["x"].shape[-2:]
    qy, qx = args.query if args.query else (H // 2, W // 2)
    check_query([qy, qx], H, W, f"stage {args.stage}'s")
    with torch.no_grad():
        probs = attn.attention_probs(captured["x"])[0, args.head, qy * W + qx]  # (Hk*Wk,)
    top = probs.topk(min(args.topk, probs.numel()))

    S = shown.shape[0]
    def to_px(p: torch.Tensor) -> np.ndarray:
        """[-1, 1] (y, x) on the H x W map (corners aligned, as grid_sample) -> (x, y) pixels."""
        y = ((p[..., 0] + 1) / 2 * (H - 1) + 0.5) * S / H
        x = ((p[..., 1] + 1) / 2 * (W - 1) + 0.5) * S / W
        return torch.stack([x, y], -1).reshape(-1, 2).numpy()

    pts, refs = to_px(pos), to_px(ref)
    q_px = ((qx + 0.5) * S / W, (qy + 0.5) * S / H)
    drawn = np.concatenate([pts, refs])  # DAT++ reference points may lie past the map's edge
    margin = max(S / max(H, W) / 2, -drawn.min(), drawn.max() - (S - 1)) + 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax in axes:
        ax.imshow(shown, interpolation="nearest")
        ax.set_xlim(-margin, S - 1 + margin)
        ax.set_ylim(S - 1 + margin, -margin)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[0]
    for (rx, ry), (px, py) in zip(refs, pts):
        ax.plot([rx, px], [ry, py], color="yellow", lw=1, alpha=0.8)
    ax.scatter(refs[:, 0], refs[:, 1], s=14, c="white", edgecolors="black", lw=0.5, label="reference")
    ax.scatter(pts[:, 0], pts[:, 1], s=30, c="red", edgecolors="white", lw=0.5, label="sampled")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"stage {args.stage} block {block} group {group}: "
                 f"{pos.shape[0]}x{pos.shape[1]} sampling points", fontsize=10)
    ax = axes[1]
    ax.scatter(pts[:, 0], pts[:, 1], s=10, c="white", alpha=0.6)
    weights = top.values.numpy()
    chosen = pts[top.indices.numpy()]
    dots = ax.scatter(chosen[:, 0], chosen[:, 1], s=60 + 600 * weights / weights.max(), c=weights,
                      cmap="autumn", edgecolors="black", lw=0.5)
    ax.scatter([q_px[0]], [q_px[1]], marker="*", s=300, c="cyan", edgecolors="black", zorder=3)
    fig.colorbar(dots, ax=ax, fraction=0.046, label="attention weight")
    ax.set_title(f"query ({qy}, {qx}) head {args.head}: top {len(weights)} keys "
                 f"({weights.sum():.2f} of its attention)", fontsize=10)
    fig.tight_layout()
    save(fig, args.out)
    return dict(positions=pos, references=ref, points_px=pts, query=(qy, qx),
                top_keys=top.indices, top_weights=top.values, block=block, group=group)


def save(fig: plt.Figure, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def model_parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor override, e.g. depth=2 (repeatable)")
    p.add_argument("--checkpoint", default="", help="state dict or checkpoint with a 'model' entry")
    p.add_argument("--fit-digits", type=int, default=0, metavar="STEPS",
                   help="without a checkpoint: fit on sklearn digits for STEPS steps first")
    p.add_argument("--image", default="", help="PNG/JPG; default: a held-out digit")
    p.add_argument("--epoch", type=int, default=None, help="schedule point (set_progress) to show")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--query", type=int, nargs=2, default=None, metavar=("Y", "X"),
                   help="query patch (default: CLS / a few patches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p


def main(argv: Optional[list[str]] = None):
    """Runs one subcommand; returns what it returns (dat-points: what it drew)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lai-mask", help="LAI masks: corrected 2-D window and faithful 1-D band")
    p.add_argument("--grid", type=int, nargs=2, default=[8, 8], metavar=("H", "W"))
    p.add_argument("--prefix", type=int, default=1, help="prefix tokens (CLS)")
    p.add_argument("--radius", type=int, default=None, help="r = w for both masks")
    p.add_argument("--schedule", default="[[0, 1], [10, 2], [20, 4], [40, null]]",
                   help="2-D schedule (YAML), used with --epoch when --radius is not given")
    p.add_argument("--schedule-1d", default="[[0, 8], [22, 12], [32, 18], [42, 20], [60, null]]")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--query", type=int, nargs=2, default=[3, 4], metavar=("Y", "X"))
    p.add_argument("--out", required=True)
    p.set_defaults(func=plot_lai_mask)
    p = model_parser(sub, "attention-map", "attention of one query/head/layer over an image")
    p.add_argument("--head", type=int, default=0)
    p.set_defaults(func=plot_attention_map)
    p = model_parser(sub, "deform-points", "deformable sampling points over an image")
    p.set_defaults(func=plot_deform_points)
    p = sub.add_parser("dat-points", help="DAT / DAT++: deformed sampling points of a 'D' block "
                                          "and one query's top-attended keys")
    p.add_argument("--cfg", required=True, help="DAT config (configs/dat/*.yaml)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    p.add_argument("--checkpoint", default="", help="weights (ours or released); default: random init")
    p.add_argument("--image", default="", help="PNG/JPG; default: an sklearn digit")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--block", type=int, default=None, help="default: the stage's first 'D' block")
    p.add_argument("--head", type=int, default=0, help="its offset group's points are drawn")
    p.add_argument("--query", type=int, nargs=2, default=None, metavar=("Y", "X"),
                   help="query position on the stage's map (default: its centre)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=dat_points)
    args = parser.parse_args(argv)
    return args.func(args)


def cli() -> None:
    main()


if __name__ == "__main__":
    run_tool(cli)
