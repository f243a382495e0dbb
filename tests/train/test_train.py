from __future__ import annotations

import json

import pytest
import torch
import yaml

from lipkit.errors import ConfigError, TrainingDivergedError
from lipkit.train import checkpoint as ckpt
from lipkit.train import loop
from lipkit.train.config import OptimConfig, TrainConfig, resolve_config
from lipkit.train.metrics import read_metrics
from lipkit.train.optim import lr_at, param_groups


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.mark.slow
def test_tiny_run_learns_and_writes_its_outputs(run_overrides):
    cfg = resolve_config("tiny-synthetic", overrides=[*run_overrides, "steps=40", "log_every=5"])
    result = loop.train(cfg)
    assert result.step == 40 and result.checkpoint.is_file()
    records = read_metrics(result.run_dir)
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]  # it learns the synthetic pairing
    assert {"loss", "lr", "logit_scale", "grad_norm", "samples_per_s"} <= set(records[0])
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["steps"] == 40 and saved["data"]["train"] == "synthetic"
    assert resolve_config(config_file=str(result.run_dir / "config.yaml")) == cfg
    assert json.loads((result.run_dir / "summary.json").read_text())["step"] == 40


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_uninterrupted(run_overrides, tmp_path):
    base = [*run_overrides, "steps=12", "log_every=1", "checkpoint_every=4", "data.workers=0"]
    full = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=full"]))

    def crash(step, _metrics):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=cut"]), callbacks=[crash])
    cut_dir = tmp_path / "cut"
    assert [p.name for p in ckpt.list_checkpoints(cut_dir)] == ["step_00000004.pt"]
    resumed = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=cut", "resume=latest"]))
    assert losses(resumed.run_dir) == losses(full.run_dir)  # exact: same steps, same values
    a = torch.load(full.checkpoint, weights_only=True)["model"]
    b = torch.load(resumed.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_with_workers_and_another_worker_count_matches_too(run_overrides):
    base = [*run_overrides, "steps=6", "log_every=1", "checkpoint_every=3", "data.workers=2"]
    full = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=a"]))
    loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=b"]))
    # Restart b from its step-3 checkpoint by deleting the later one.
    ckpt.list_checkpoints(full.run_dir.parent / "b")[-1].unlink()
    resumed = loop.train(
        resolve_config("tiny-synthetic", overrides=[*base, "name=b", "resume=latest", "data.workers=0"])
    )
    assert losses(resumed.run_dir) == losses(full.run_dir)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(run_overrides, monkeypatch):
    real = loop.compute_loss
    calls = {"n": 0}

    def poisoned(state, images, tokens):
        calls["n"] += 1
        loss = real(state, images, tokens)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    cfg = resolve_config("tiny-synthetic", overrides=[*run_overrides, "checkpoint_every=5", "log_every=5"])
    with pytest.raises(TrainingDivergedError, match="at step 7"):
        loop.train(cfg)
    kept = ckpt.list_checkpoints(ckpt.Path(cfg.out_dir) / cfg.name)
    assert [p.name for p in kept] == ["step_00000005.pt"]
    state = ckpt.load_checkpoint(kept[0])
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_existing_run_is_not_overwritten_by_accident(run_overrides):
    cfg = resolve_config("tiny-synthetic", overrides=[*run_overrides, "steps=2"])
    loop.train(cfg)
    with pytest.raises(ConfigError, match="resume=latest"):
        loop.train(cfg)
    again = loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, "steps=2", "overwrite=true"]))
    assert again.step == 2 and len(read_metrics(again.run_dir)) == 1


@pytest.mark.parametrize("extra", [["precision=bf16"], ["model=tiny-siglip", "loss=siglip", "data.batch_size=8"]])
def test_bf16_and_siglip_runs(run_overrides, extra):
    result = loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, "steps=4", *extra]))
    assert result.step == 4 and result.loss == result.loss


def test_siglip_loss_needs_a_bias(run_overrides):
    with pytest.raises(ConfigError, match="logit bias"):
        loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, "loss=siglip"]))


def test_no_weight_decay_on_norms_biases_embeddings_and_temperature():
    from lipkit.models import create_model

    model = create_model("micro")
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"logit_scale", "visual.cls_token", "visual.pos_embed", "text.token_embed.weight"} <= no_decay_names
    assert "visual.transformer.blocks.0.norm1.weight" in no_decay_names
    assert "visual.transformer.blocks.0.attn.qkv.bias" in no_decay_names
    assert "visual.transformer.blocks.0.attn.qkv.weight" in decay_names and "text.proj.weight" in decay_names


def test_schedule_warms_up_then_decays():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    assert lr_at(50, 100, OptimConfig(lr=1.0, warmup_steps=0, schedule="constant")) == 1.0


def test_config_validation():
    with pytest.raises(ConfigError, match="precision"):
        resolve_config(overrides=["precision=fp8"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*optim.lr"):
        resolve_config("tiny-synthetic", overrides=["optim.lrr=1"])
    assert resolve_config() == TrainConfig()  # no preset, file or override: the defaults


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    overrides = [f"out_dir={tmp_path}", "progress=false", "device=cpu", "steps=2", "log_every=1"]
    result = loop.train(resolve_config("tiny-synthetic", overrides=overrides))
    events = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_streaming_loss_trains_like_the_plain_loss(run_overrides):
    base = [*run_overrides, "steps=4", "log_every=1"]
    plain = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=plain"]))
    tiled = loop.train(
        resolve_config(
            "tiny-synthetic", overrides=[*base, "name=tiled", "loss=infonce-streaming", "loss_options.tile=5"]
        )
    )
    for (s1, a), (s2, b) in zip(losses(plain.run_dir), losses(tiled.run_dir)):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4)


@pytest.mark.slow
def test_training_from_shards_counts_undecodable_images(run_overrides, tmp_path):
    import io
    import tarfile

    from lipkit.data.corpora import SyntheticPairs

    pairs = SyntheticPairs(size=20, image_size=32)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(20):
            buf = io.BytesIO()
            pairs.image(i).save(buf, format="JPEG")
            image = b"not a jpeg at all" if i == 7 else buf.getvalue()
            for name, payload in ((f"{i:05d}.jpg", image), (f"{i:05d}.txt", pairs.caption(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    overrides = [*run_overrides, f"data.train={tmp_path}/{{00000..00000}}.tar", "data.batch_size=4", "steps=5"]
    result = loop.train(resolve_config("tiny-synthetic", overrides=overrides))
    assert result.step == 5
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert sum(summary["data"]["replaced"].values()) == 1
    assert "replaced 1 samples" in result.data_summary


@pytest.mark.slow
def test_pure_bf16_keeps_weights_in_bf16_and_tracks_the_fp32_losses(run_overrides):
    base = [*run_overrides, "steps=4", "log_every=1"]
    full = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=fp32"]))
    result = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=bf16", "precision=bf16-pure"]))
    bf16_losses = [r["loss"] for r in read_metrics(result.run_dir)]
    assert bf16_losses == pytest.approx([r["loss"] for r in read_metrics(full.run_dir)], rel=0.03)  # bf16: ~3 digits
    state = torch.load(result.checkpoint, weights_only=True)["model"]
    assert state["visual.patch_embed.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_and_channels_last_runs_match_eager(run_overrides):
    base = [*run_overrides, "steps=3", "log_every=1"]
    eager = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=eager"]))
    fast = loop.train(
        resolve_config("tiny-synthetic", overrides=[*base, "name=fast", "compile=aot_eager", "channels_last=true"])
    )
    a = [r["loss"] for r in read_metrics(eager.run_dir)]
    b = [r["loss"] for r in read_metrics(fast.run_dir)]
    assert b == pytest.approx(a, rel=1e-4)


def test_compile_auto_compiles_on_cuda_only():
    assert loop.compile_backend("auto", torch.device("cuda")) == "inductor"
    assert loop.compile_backend("auto", torch.device("cpu")) is None
    assert loop.compile_backend(None, torch.device("cuda")) is None
    assert loop.compile_backend("aot_eager", torch.device("cpu")) == "aot_eager"
    assert resolve_config("tiny-synthetic").compile == "auto"
    assert resolve_config("tiny-synthetic", overrides=["compile=null"]).compile is None


@pytest.mark.parametrize(
    ("name", "options", "one", "across"),
    [
        ("infonce", {}, "InfoNCELoss", "DistributedInfoNCELoss"),
        ("siglip", {}, "SigmoidLoss", "DistributedSigmoidLoss"),
        ("infonce-streaming", {"tile": 8}, "StreamingInfoNCELoss", "DistributedStreamingInfoNCELoss"),
        ("siglip-streaming", {"tile": 8}, "StreamingSigmoidLoss", "RingSigmoidLoss"),
        ("siglip-ring", {"tile": 8}, "RingSigmoidLoss", "RingSigmoidLoss"),
    ],
)
def test_across_processes_the_loss_takes_its_distributed_form(name, options, one, across):
    from dataclasses import replace

    from lipkit.train.distributed import DistEnv

    cfg = replace(resolve_config("tiny-synthetic"), loss=name, loss_options=options)
    assert type(loop.loss_for(cfg, DistEnv())).__name__ == one
    loss = loop.loss_for(cfg, DistEnv(rank=1, world_size=2))
    assert type(loss).__name__ == across and vars(loss).get("tile") == options.get("tile")
