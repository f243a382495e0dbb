"""CoCa: parity with OpenCLIP's CoCa (embeddings, captioning logits and loss, greedy captions), export back to
OpenCLIP, beam search against an exhaustive search, sampling filters, training and ``lipkit caption``.

The OpenCLIP twins are depth-reduced (one block per tower and in the decoder, a 2x2 patch grid, 16 tokens
over a 300-token vocabulary). OpenCLIP leaves its decoder's output projection uninitialised
(``torch.empty``), so every twin draws it afresh before the weights are saved.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lipkit
from lipkit.cli.main import main
from lipkit.errors import ConfigError, LipkitError
from lipkit.losses import create_loss
from lipkit.models.coca import CoCa, _picker, _Rules
from lipkit.models.config import get_model_config
from lipkit.models.convert import export_openclip

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TOL = {"atol": 1e-5, "rtol": 1e-5}
LOGIT_TOL = {"atol": 1e-4, "rtol": 1e-4}  # logits over the vocabulary, up to about 10 in size
VOCAB, CONTEXT = 300, 16
SOT, EOS = 298, 299  # start and end ids inside the twins' vocabulary
COCA_NAMES = ["coca_ViT-B-32", "coca_ViT-L-14", "coca_base", "coca_roberta-ViT-B-32"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def openclip_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCLIP 3.3's CoCa imports ``BeamSearchScorer``, which transformers 5 no longer has, and then refuses to
    generate at all; its greedy path needs only the logit processors, which transformers 5 still has."""
    import open_clip.coca_model as coca_model

    for name in (
        "LogitsProcessorList",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "RepetitionPenaltyLogitsProcessor",
        "MinLengthLogitsProcessor",
        "MaxLengthCriteria",
        "StoppingCriteriaList",
    ):
        monkeypatch.setattr(coca_model, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)


def is_hf(name: str) -> bool:
    return bool(open_clip.get_model_config(name)["text_cfg"].get("hf_model_name"))


def local_roberta(monkeypatch: pytest.MonkeyPatch, twin: bool = True) -> None:
    """OpenCLIP's RoBERTa tower reads the config lipkit ships (one layer and the twin's vocabulary if ``twin``)."""
    import open_clip.hf_model

    from lipkit.models.text import resolve_local_path

    folder = resolve_local_path(get_model_config("coca_roberta-ViT-B-32").text_config().path)

    class LocalConfig:
        @staticmethod
        def from_pretrained(hub_name: str, **kwargs: Any) -> Any:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            if twin:
                config.num_hidden_layers, config.vocab_size = 1, VOCAB
            return config

    monkeypatch.setattr(open_clip.hf_model, "AutoConfig", LocalConfig)


def twin(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """OpenCLIP's CoCa ``name``, depth-reduced, with perturbed weights; and lipkit's overrides for the same twin."""
    cfg = open_clip.get_model_config(name)
    size = 2 * cfg["vision_cfg"]["patch_size"]
    vision = {**cfg["vision_cfg"], "layers": 1, "image_size": size}
    text = {**cfg["text_cfg"], "vocab_size": VOCAB}  # a Hugging Face tower's decoder predicts text_cfg's vocabulary
    if not is_hf(name):
        text.update(layers=1, context_length=CONTEXT)
    else:
        text["hf_model_pretrained"] = False
    multimodal = {**cfg["multimodal_cfg"], "layers": 1, "context_length": CONTEXT}
    torch.manual_seed(seed)
    oc = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=text, multimodal_cfg=multimodal)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        oc.text_decoder.text_projection.normal_(0, oc.text_decoder.width**-0.5, generator=gen)
        for param in oc.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    text_small = {"config_overrides": {"num_hidden_layers": 1, "vocab_size": VOCAB}} if is_hf(name) else {}
    if not is_hf(name):
        text_small = {"layers": 1, "vocab_size": VOCAB, "context_length": CONTEXT}
    overrides = {
        "vision": {"layers": 1, "image_size": size},
        "text": text_small,
        "decoder": {"layers": 1, "vocab_size": VOCAB, "context_length": CONTEXT},
    }
    return oc.eval(), overrides


def batch(lk: CoCa, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and texts: a start token, ids, an end token, then padding (one text has padding inside)."""
    gen = torch.Generator().manual_seed(1)
    size = lk.cfg.vision_config().image_size
    images = torch.randn(rows, 3, size, size, generator=gen)
    pad = lk.pad_id
    tokens = torch.randint(3, VOCAB - 2, (rows, CONTEXT), generator=gen)
    tokens[:, 0] = SOT
    for row, end in enumerate([5, 9, CONTEXT - 1][:rows]):
        tokens[row, end] = EOS
        tokens[row, end + 1 :] = pad
    tokens[0, 3] = pad  # a padding id inside a text: masked as a key, as OpenCLIP masks it
    return images, tokens


def load_twin(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, CoCa]:
    if is_hf(name):
        local_roberta(monkeypatch)
    oc, overrides = twin(name)
    torch.save(oc.state_dict(), tmp_path / "coca.pt")
    lk = lipkit.create_model(name, pretrained=str(tmp_path / "coca.pt"), **overrides)
    assert isinstance(lk, CoCa)
    return oc, lk


@pytest.mark.parametrize("name", COCA_NAMES)
def test_openclip_coca_parity(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openclip_generate) -> None:
    oc, lk = load_twin(name, tmp_path, monkeypatch)
    images, tokens = batch(lk)
    with torch.no_grad():
        ref, out = oc(images, tokens), lk(images, tokens)
        torch.testing.assert_close(out.image_features, ref["image_features"], **TOL)
        torch.testing.assert_close(out.text_features, ref["text_features"], **TOL)
        torch.testing.assert_close(out.logits, ref["logits"], **LOGIT_TOL)
        assert torch.equal(out.labels, ref["labels"])
        torch.testing.assert_close(lk.encode_image(images, normalize=True), oc.encode_image(images), **TOL)
        torch.testing.assert_close(lk.encode_text(tokens, normalize=True), oc.encode_text(tokens), **TOL)
        # the captioning loss, OpenCLIP's weights (contrastive 1, captioning 2) and its padding id (0)
        clip_ref, caption_ref = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
            ref["image_features"], ref["text_features"], ref["logits"], ref["labels"], ref["logit_scale"]
        )
        parts = create_loss("coca", pad_id=0).parts(out)
        torch.testing.assert_close(parts["contrastive_loss"], clip_ref, **TOL)
        torch.testing.assert_close(parts["caption_loss"], caption_ref, **TOL)
        # greedy captions: OpenCLIP's top-k sampling with k = 1
        pictures = torch.randn(4, *images.shape[1:], generator=torch.Generator().manual_seed(5))
        expected = oc.generate(
            pictures, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=4, max_seq_len=CONTEXT,
            sot_token_id=SOT, eos_token_id=EOS, pad_token_id=lk.pad_id,
        )  # fmt: skip
        got = lk.generate(pictures, method="greedy", max_length=12, min_length=4, sot_id=SOT, eos_id=EOS)
    assert got.shape[1] > 4 and torch.equal(got, expected)
    assert lk.cached_decoding == (not is_hf(name))  # the causal CLIP tower decodes from caches


@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_roberta-ViT-B-32"])
def test_export_loads_back_in_openclip(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oc, lk = load_twin(name, tmp_path, monkeypatch)
    with torch.no_grad():
        for param in lk.parameters():
            param.add_(0.01)
    export_openclip(lk, tmp_path / "back.pt")
    oc.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True), strict=True)
    images, tokens = batch(lk)
    with torch.no_grad():
        torch.testing.assert_close(lk(images, tokens).logits, oc(images, tokens)["logits"], **LOGIT_TOL)


@pytest.mark.parametrize("name", COCA_NAMES)
def test_full_size_keys_and_shapes_match_openclip(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lipkit.models.convert import layouts, lipkit_to_openclip, openclip_to_lipkit, tower_rules
    from lipkit.models.factory import build_model

    if is_hf(name):
        local_roberta(monkeypatch, twin=False)
    with torch.device("meta"):
        oc = open_clip.create_model(name, pretrained=None, pretrained_text=False, device="meta")
        lk = build_model(get_model_config(name))
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    layout, text_layout = layouts(lk)
    assert shapes(openclip_to_lipkit(oc.state_dict(), layout, text_layout, tower_rules(lk))) == shapes(lk.state_dict())
    exported = lipkit_to_openclip(lk.state_dict(), layout or None, lk.cfg.custom_text, text_layout, tower_rules(lk))
    assert shapes(exported) == shapes(oc.state_dict())


# --- generation ---


def tiny_coca(vocab: int = VOCAB, seed: int = 0) -> CoCa:
    torch.manual_seed(seed)
    model = lipkit.create_model(
        "tiny-coca", text={"vocab_size": vocab, "context_length": CONTEXT}, decoder={"vocab_size": vocab}
    )
    with torch.no_grad():  # sharper next-token distributions than a fresh init gives
        model.decoder.head.weight.mul_(8.0)
    return model


def test_cached_decoding_equals_rerunning_the_whole_caption() -> None:
    model = tiny_coca()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    runs = {}
    for cached in (True, False):
        model.cached_decoding = cached
        runs[cached] = [
            model.generate(images, method=m, max_length=12, sot_id=SOT, eos_id=EOS, num_beams=3,
                           generator=torch.Generator().manual_seed(2))
            for m in ("greedy", "top_k", "beam")
        ]  # fmt: skip
    for a, b in zip(runs[True], runs[False], strict=True):
        assert torch.equal(a, b)


def sequence_logprob(model: CoCa, images: torch.Tensor, seq: list[int], rules: _Rules) -> float:
    """Total log-probability of ``seq`` (after the start token) under the model, with the rules applied."""
    ids = torch.tensor([seq])
    _, image_tokens = model.encode_image_tokens(images)
    _, states = model.text.pooled_and_tokens(ids)
    logits = model.decoder(image_tokens, states)[0]  # (T, V)
    total = 0.0
    for t in range(1, len(seq)):
        step = rules(logits[t - 1 : t].clone(), ids[:, :t])
        total += float(F.log_softmax(step, dim=-1)[0, seq[t]])
    return total


@torch.no_grad()
def test_beam_search_finds_the_exhaustive_optimum() -> None:
    """With as many beams as there are prefixes, beam search must return the best caption of all."""
    vocab, sot, eos, max_length = 5, 3, 4, 5  # captions: sot + up to 4 tokens
    model = tiny_coca(vocab=vocab, seed=3)
    model.pad_id = 0
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    rules = _Rules(min_length=2, repetition_penalty=1.0, eos_id=eos)
    best, best_seq = -math.inf, None
    words = [0, 1, 2, 3]  # every token but the end token may appear inside a caption
    ended = [[sot, *body, eos] for n in range(max_length - 1) for body in itertools.product(words, repeat=n)]
    cut = [[sot, *body] for body in itertools.product(words, repeat=max_length - 1)]  # stopped by the length limit
    for seq in [*ended, *cut]:  # score: log-probability over the tokens after the start token
        score = sequence_logprob(model, images, seq, rules) / (len(seq) - 1)
        if score > best:
            best, best_seq = score, seq
    got = model.generate(images, method="beam", num_beams=4**3, max_length=max_length, min_length=2,
                         sot_id=sot, eos_id=eos)  # fmt: skip
    found = got[0].tolist()
    found = found[: found.index(eos) + 1] if eos in found else found
    assert best > -math.inf and found == best_seq


def test_one_beam_is_greedy_without_the_forced_end() -> None:
    model = tiny_coca()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    greedy = model.generate(images, method="greedy", max_length=10, sot_id=SOT, eos_id=EOS)
    beam = model.generate(images, method="beam", num_beams=1, max_length=10, sot_id=SOT, eos_id=EOS)
    for g, b in zip(greedy.tolist(), beam.tolist(), strict=True):
        g = g[: g.index(EOS) + 1] if EOS in g[:-1] else g[:-1]  # greedy forces the end token at the limit
        assert b[: len(g)] == g


def test_top_k_and_top_p_sample_only_the_kept_tokens() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, -1).clone()
    gen = torch.Generator().manual_seed(0)
    top2 = _picker("top_k", 2, 0.9, 1.0, gen)(logits)
    assert set(top2.tolist()) == {0, 1} and abs((top2 == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    nucleus = _picker("top_p", 50, 0.75, 1.0, gen)(logits)  # 0.5 < 0.75 <= 0.5 + 0.3: the two best
    assert set(nucleus.tolist()) == {0, 1}
    assert set(_picker("top_p", 50, 0.5, 1.0, gen)(logits).tolist()) == {0}
    assert set(_picker("top_p", 50, 0.96, 1.0, gen)(logits).tolist()) == {0, 1, 2, 3}


def test_rules_ban_the_end_token_early_and_penalise_repeats() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    out = torch.tensor([[3, 0, 1]])
    ruled = _Rules(min_length=4, repetition_penalty=2.0, eos_id=3)(logits.clone(), out)
    assert ruled.tolist() == [[1.0, -4.0, 1.0, float("-inf")]]
    assert _Rules(min_length=3, repetition_penalty=1.0, eos_id=3)(logits.clone(), out).tolist() == logits.tolist()


def test_generate_refuses_bad_settings() -> None:
    model = tiny_coca()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(LipkitError, match="unknown generation method 'nucleus'"):
        model.generate(images, method="nucleus")
    with pytest.raises(LipkitError, match="min_length < max_length"):
        model.generate(images, min_length=9, max_length=9, sot_id=SOT, eos_id=EOS)
    with pytest.raises(LipkitError, match="below the vocabulary"):
        model.generate(images)  # CLIP's start token 49406 is past the 300-token vocabulary
    with pytest.raises(LipkitError, match="top_p must be in"):
        model.generate(images, method="top_p", top_p=0.0, sot_id=SOT, eos_id=EOS)


def test_decoder_width_must_match_the_towers() -> None:
    with pytest.raises(ConfigError, match=r"decoder\.width 32 must equal the image token width 64"):
        lipkit.create_model("tiny-coca", decoder={"width": 32, "heads": 2})


# --- training and the command line ---


@pytest.mark.slow
def test_training_lowers_the_captioning_loss_and_captions_from_the_run(
    run_overrides, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lipkit.train import loop
    from lipkit.train.config import resolve_config
    from lipkit.train.metrics import read_metrics

    cfg = resolve_config("tiny-coca", overrides=[*run_overrides, "data.train=synthetic", "steps=40", "log_every=5",
                                                  "data.batch_size=16", "data.workers=0"])  # fmt: skip
    result = loop.train(cfg)
    records = read_metrics(result.run_dir)
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 30), color).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    assert main(["caption", str(result.run_dir), str(folder), "--method", "greedy", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["0.png", "1.png", "2.png"]
    assert all(r["caption"] and isinstance(r["caption"], str) for r in lines)
    assert "skipped" in captured.err and "broken.jpg" in captured.err and "1 of 4 files" in captured.err


def test_captioning_needs_a_coca_model_and_the_coca_loss(run_overrides) -> None:
    from lipkit.train import loop
    from lipkit.train.config import resolve_config

    with pytest.raises(ConfigError, match="has a captioning decoder: train it with loss 'coca'"):
        loop.train(resolve_config("tiny-coca", overrides=[*run_overrides, "loss=infonce", "data.train=synthetic"]))
    with pytest.raises(ConfigError, match="trains a captioning decoder; micro has none"):
        loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, "loss=coca"]))
    with pytest.raises(ConfigError, match="cache_features"):
        loop.train(
            resolve_config("tiny-coca", overrides=[*run_overrides, "cache_features=true", "data.train=synthetic"])
        )


def test_caption_command_refuses_a_model_without_decoder(tmp_path: Path, capsys) -> None:
    model = lipkit.create_model("micro")
    torch.save(model.state_dict(), tmp_path / "micro.pt")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["caption", str(tmp_path / "micro.pt"), "--model", "micro", str(tmp_path / "a.png")]) == 2
    assert "has no captioning decoder" in capsys.readouterr().err


# --- the loss across processes ---


class _Out:
    def __init__(self, rows: slice) -> None:
        g = torch.Generator().manual_seed(0)
        self.image_features = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)[rows]
        self.text_features = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)[rows]
        self.logits = torch.randn(8, 5, 11, generator=g, dtype=torch.float64)[rows]
        self.labels = torch.randint(1, 11, (8, 5), generator=g)[rows]  # no padding: equal counts on each rank
        self.logit_scale, self.logit_bias, self.pad_id = torch.tensor(7.0, dtype=torch.float64), None, 0


def _coca_rank(rank: int, world: int, port: int, queue: Any) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = 8 // world
    loss = create_loss("coca-distributed")(_Out(slice(rank * b, (rank + 1) * b))).detach()
    dist.all_reduce(loss)
    queue.put(float(loss) / world)  # what DDP's averaging optimises: the mean of the ranks' losses
    dist.destroy_process_group()


@pytest.mark.slow
def test_coca_loss_across_two_processes_equals_one_process() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_coca_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    expected = float(create_loss("coca")(_Out(slice(None))))
    assert results[0] == pytest.approx(expected, rel=1e-9) and results[1] == pytest.approx(expected, rel=1e-9)
