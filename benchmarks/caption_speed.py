"""Caption speed: lipkit's ``CoCa.generate`` against OpenCLIP's ``CoCa.generate``, the same weights, side by side.

Builds OpenCLIP's CoCa by name with random weights (its decoder projection drawn afresh: OpenCLIP leaves it
uninitialised), loads the same state dict into lipkit, and captions the same random images greedily
(OpenCLIP: ``generation_type="top_k", top_k=1``) with no end token allowed before ``--length``, so both
write captions of exactly that length. The two take turns for ``--rounds`` rounds; the script checks that
the captions are identical and prints captions/s for each and the ratio. lipkit decodes from cached keys
and values (each step computes only the new token); OpenCLIP reruns the text tower and the decoder over
the whole caption at every step.

OpenCLIP 3.3 refuses to generate under transformers 5 (it imports ``BeamSearchScorer``, which transformers 5
dropped); its greedy path needs only the logit processors, which the script hands it.

Run: ``PYTHONPATH=src python benchmarks/caption_speed.py --model coca_ViT-B-32 --batch-size 8 --length 30``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import lipkit
from results import append_result

SOT, EOS = 49406, 49407


def openclip_coca(name: str, layers: int | None) -> torch.nn.Module:
    import open_clip
    import open_clip.coca_model as coca_model
    import transformers

    for attr in ("LogitsProcessorList", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):  # fmt: skip
        setattr(coca_model, attr, getattr(transformers, attr))
    coca_model._has_transformers = True
    coca_model.GENERATION_TYPES["top_k"] = transformers.TopKLogitsWarper
    cfg = open_clip.get_model_config(name)
    shrink = {} if layers is None else {"layers": layers}
    kwargs = {f"{k}_cfg": {**cfg[f"{k}_cfg"], **shrink} for k in ("vision", "text", "multimodal")}
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, **kwargs).eval()
    with torch.no_grad():
        model.text_decoder.text_projection.normal_(0, model.text_decoder.width**-0.5)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coca_ViT-B-32", help="an OpenCLIP CoCa name (default: coca_ViT-B-32)")
    parser.add_argument("--layers", type=int, help="blocks per tower and decoder (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call (default: 8)")
    parser.add_argument("--length", type=int, default=30, help="caption length in tokens (default: 30)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per library (default: 3)")
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    args = parser.parse_args()

    oc = openclip_coca(args.model, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "coca.pt"
        torch.save(oc.state_dict(), path)
        shrink = {} if args.layers is None else {"layers": args.layers}
        lk = lipkit.create_model(args.model, pretrained=str(path), vision=shrink, text=shrink, decoder=shrink)
    size = lk.cfg.vision_config().image_size
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
    # no end token before the last position, where both force it: every caption has --length tokens
    settings = {"max_length": args.length, "min_length": args.length - 1}

    def run_openclip() -> torch.Tensor:
        return oc.generate(images, generation_type="top_k", top_k=1, seq_len=args.length, min_seq_len=args.length - 1,
                           sot_token_id=SOT, eos_token_id=EOS)  # fmt: skip

    def run_lipkit() -> torch.Tensor:
        return lk.generate(images, method="greedy", sot_id=SOT, eos_id=EOS, **settings)

    with torch.no_grad():
        outputs = {"openclip": run_openclip(), "lipkit": run_lipkit()}  # warm-up, and the captions compared
        times: dict[str, list[float]] = {"openclip": [], "lipkit": []}
        for _ in range(args.rounds):
            for name, fn in (("openclip", run_openclip), ("lipkit", run_lipkit)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    same = torch.equal(outputs["openclip"], outputs["lipkit"])
    rate = {name: args.batch_size / min(t) for name, t in times.items()}
    print(f"{args.model}{'' if args.layers is None else f' ({args.layers} layers)'}, {args.batch_size} images, "
          f"{args.length}-token greedy captions, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"captions identical: {same} {tuple(outputs['lipkit'].shape)}")
    for name in ("openclip", "lipkit"):
        print(f"{name:9s} {rate[name]:8.2f} captions/s (best of {args.rounds}: {min(times[name]):.3f} s)")
    print(f"ratio lipkit/openclip {rate['lipkit'] / rate['openclip']:.2f}x")
    append_result(args.json, "caption_speed", {
        "model": args.model, "layers": args.layers, "batch_size": args.batch_size, "length": args.length,
        "captions_per_s": rate, "identical": same, "device": "cpu", "threads": torch.get_num_threads(),
    })  # fmt: skip
    if not same:
        raise SystemExit("the captions differ")


if __name__ == "__main__":
    main()
