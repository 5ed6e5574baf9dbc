"""comp-vlm command line. Errors from the library print one line and exit non-zero (2 for usage errors)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import CompVLMError


def _median_latency_ms(fn, repeats: int = 7) -> float:
    import statistics

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_demo(args: argparse.Namespace) -> int:
    """Smallest end-to-end path: tiny CLIP -> recipe (heads, neurons, tokens) -> slice -> save -> load -> check."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    import comp_vlm
    from comp_vlm.data.text import build_word_tokenizer

    torch.manual_seed(args.seed)
    words = "a photo of red green blue small big square circle triangle left right".split()
    tok = build_word_tokenizer(words)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=4),
        projection_dim=64,
    )
    model = CLIPModel._from_config(cfg).eval()
    adapter = comp_vlm.get_adapter(model).install()
    reference = {"image_size": 32, "text_length": 12}
    dense_flops, dense_params = adapter.count_flops(reference), comp_vlm.count_params(model)
    pixels = torch.randn(8, 3, 32, 32)
    texts = tok(["a photo of a big red square left of a small blue circle"] * 8, return_tensors="pt")
    with torch.no_grad():
        dense_ms = _median_latency_ms(lambda: model(pixel_values=pixels, **texts))
    # a magnitude recipe (the CoMP search comes with the engine): half the heads and neurons, half the tokens
    for spec in adapter.tower_specs():
        for i, layer in enumerate(adapter.layers(spec)):
            w = layer.mlp.fc2.weight.abs().mean(0)
            adapter.set_neuron_mask(spec.name, i, (w >= w.median()).float())
            hw = layer.self_attn.out_proj.weight.abs().mean(0).view(spec.num_heads, -1).mean(1)
            adapter.set_head_mask(spec.name, i, (hw >= hw.median()).float())
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, 0.5)
    with torch.no_grad():
        masked = model(pixel_values=pixels, **texts).logits_per_image
    adapter.slice()
    out = comp_vlm.save_pruned(model, Path(args.out), tokenizer=tok)
    loaded = comp_vlm.load_pruned(out)
    with torch.no_grad():
        reloaded = loaded(pixel_values=pixels, **texts).logits_per_image
        pruned_ms = _median_latency_ms(lambda: loaded(pixel_values=pixels, **texts))
    gap = (masked - reloaded).abs().max().item()
    pruned_flops = comp_vlm.count_flops(loaded, reference)
    print(f"{'':10s}{'GFLOPs':>10s}{'params':>12s}{'latency ms':>12s}")
    print(f"{'dense':10s}{dense_flops / 1e9:10.4f}{dense_params:12,d}{dense_ms:12.2f}")
    print(f"{'pruned':10s}{pruned_flops / 1e9:10.4f}{comp_vlm.count_params(loaded):12,d}{pruned_ms:12.2f}")
    print(f"FLOPs kept {pruned_flops / dense_flops:.3f}; masked vs saved-and-reloaded logits max |diff| {gap:.2e}")
    print(f"saved pruned model: {out.resolve()}")
    if gap > 1e-4:
        raise CompVLMError(f"reloaded model differs from the masked one (max |diff| {gap:.2e})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comp-vlm", description="CoMP: prune vision-language models (parameters + tokens).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline end-to-end demo on a tiny CLIP")
    demo.add_argument("--out", default="runs/demo", help="where to save the pruned model (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CompVLMError as exc:
        print(f"comp-vlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("comp-vlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
