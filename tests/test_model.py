"""The Flamingo model on tiny random HF parts saved with save_pretrained and loaded back with from_pretrained."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from m3w.model import Flamingo, FlamingoConfig, build_preset
from m3w.model.flamingo import autocast_dtype
from m3w.model.generation import generate, score, score_prompts
from m3w.model.presets import LMShape, VisionShape, write_random_parts

FAMILIES = ["llama", "gpt2", "qwen2", "gpt_neox"]
SIZE = 32  # tiny preset image size


def set_gates(model: Flamingo, seed: int = 0) -> None:
    """Open the gates (they start at 0, where the model is exactly the LM) so the visual path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.xattn:
            block.attn_gate.copy_(0.5 + torch.rand(1, generator=generator))
            block.ffw_gate.copy_(0.5 + torch.rand(1, generator=generator))


def backward_grads(model: Flamingo, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Backpropagate `loss` into fresh gradients; a copy of each trainable parameter's gradient (None: none)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.trainable_parameters()}


def images_for(batch: int, slots: int, frames: int = 1, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, slots, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def encode(model: Flamingo, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return enc.input_ids, enc.attention_mask


def bare_lm_logits(model: Flamingo, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The frozen LM alone on the same input embeddings (the new tokens' rows start as the LM's own rows)."""
    embeds = model.new_tokens.embed(input_ids, model.lm.get_input_embeddings())
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return model.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions).logits


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread hand-offs cost more than they save, badly so on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("tiny")
    config = build_preset("tiny", workdir)
    (workdir / "config.json").write_text(json.dumps(config.__dict__))
    return workdir


@pytest.fixture
def tiny(tiny_dir) -> Flamingo:
    torch.manual_seed(0)
    config = FlamingoConfig(**json.loads((tiny_dir / "config.json").read_text()))
    return Flamingo.from_config(config).eval()


# ---- the gates: at init the model is the LM ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_init_logits_equal_bare_lm_with_images(family, tmp_path):
    model = Flamingo.from_config(
        build_preset("tiny", tmp_path, family=family, overrides=["cross_attn_every=1"])
    )
    model.eval()
    ids, mask = encode(model, ["a photo <image> of a cat <EOC> and <image> a dog", "<image> short"])
    media_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        ours = model(ids, mask, images_for(2, 2), media_mask).logits
        bare = bare_lm_logits(model, ids, mask)
    lm_vocab = bare.shape[-1]
    real = mask.bool()
    assert torch.allclose(ours[..., :lm_vocab][real], bare[real], atol=1e-5, rtol=1e-5)
    assert all(v == 0.0 for v in model.gate_values().values())
    # ... and the visual path is wired: opening the gates changes the logits
    set_gates(model)
    with torch.no_grad():
        opened = model(ids, mask, images_for(2, 2), media_mask).logits
    assert not torch.allclose(opened[real], ours[real], atol=1e-3)


def test_text_only_batch(tiny):
    ids, mask = encode(tiny, ["just some text without media"])
    with torch.no_grad():
        out = tiny(ids, mask, labels=ids, return_logits=True)
        assert torch.allclose(
            out.logits[..., : tiny.new_tokens.lm_vocab], bare_lm_logits(tiny, ids, mask), atol=1e-5
        )
    assert torch.isfinite(out.loss)
    # a batch whose media slots are all padding is a text-only batch
    with torch.no_grad():
        padded = tiny(ids, mask, images_for(1, 2), torch.zeros(1, 2, dtype=torch.bool)).logits
    assert torch.equal(padded, out.logits)
    stray, stray_mask = encode(tiny, ["text with <image> but no image"])
    with pytest.raises(ValueError, match="<image> tokens"):
        tiny(stray, stray_mask)


def test_count_mismatch_raises_clear_error(tiny):
    ids, mask = encode(tiny, ["<image> one <image> two", "<image> only one"])
    with pytest.raises(
        ValueError, match=r"rows \[1\].*number of <image> tokens \[1\] != number of media.*\[2\]"
    ):
        tiny(ids, mask, images_for(2, 2))  # row 1 has one <image> but two real media
    tiny(
        ids, mask, images_for(2, 2), torch.tensor([[True, True], [True, False]])
    )  # with the media mask: fine


# ---- per-image masking -----------------------------------------------------------------------------------------


def capture_first_block(model: Flamingo) -> list[torch.Tensor]:
    """The first gated block's output minus its input: what cross-attention (+ gated FFW) adds, before any LM
    layer mixes tokens."""
    outputs: list[torch.Tensor] = []
    model.xattn[0].register_forward_hook(lambda m, args, out: outputs.append((out - args[0]).detach()))
    return outputs


def test_masking_locality(tiny):
    set_gates(tiny)
    ids, mask = encode(
        tiny, ["text before <image> first chunk here <EOC> <image> second chunk <EOC> <image> third"]
    )
    positions = (ids[0] == tiny.media_token_id).nonzero().flatten().tolist()
    added = capture_first_block(tiny)
    base_images = images_for(1, 3, seed=1)
    with torch.no_grad():
        base = tiny(ids, mask, base_images).logits
    for k in range(3):
        changed_images = base_images.clone()
        changed_images[0, k] = torch.randn_like(changed_images[0, k])
        with torch.no_grad():
            logits = tiny(ids, mask, changed_images).logits
        chunk = torch.zeros(ids.shape[1], dtype=torch.bool)
        chunk[positions[k] : positions[k + 1] if k + 1 < 3 else None] = True
        differs = (added[-1] - added[0]).abs().amax(-1)[0] > 0
        assert torch.equal(differs, chunk), f"image {k}: cross-attention changed outside its chunk"
        # logits: nothing before <image> k changes, the tokens of chunk k do (later chunks see chunk k through
        # the LM's own causal self-attention, as in the paper)
        assert torch.equal(logits[0, : positions[k]], base[0, : positions[k]])
        assert (logits[0, chunk] - base[0, chunk]).abs().amax(-1).min() > 0


def test_text_before_first_image_sees_nothing(tiny):
    set_gates(tiny)
    ids, mask = encode(tiny, ["some words before any image <image> after"])
    first = (ids[0] == tiny.media_token_id).nonzero()[0, 0]
    added = capture_first_block(tiny)
    outs = []
    for seed in (1, 2):
        with torch.no_grad():
            outs.append(tiny(ids, mask, images_for(1, 1, seed=seed)).logits)
    assert torch.equal(outs[0][0, :first], outs[1][0, :first])
    # their cross-attention output is exactly zero: the block adds only its gated FFW, exactly what it adds to
    # the same words in a text-only batch
    with torch.no_grad():
        tiny(ids[:, :first], mask[:, :first])
    assert torch.equal(added[0][0, :first], added[-1][0])
    assert torch.isfinite(added[0]).all()


def test_padding_tokens_give_finite_values_and_gradients(tiny):
    set_gates(tiny)
    tiny.train()
    ids, mask = encode(tiny, ["<image> x", "words first then <image> and more"])
    out = tiny(ids, mask, images_for(2, 1), labels=ids.masked_fill(mask == 0, -100), return_logits=True)
    out.loss.backward()
    assert torch.isfinite(out.logits[mask.bool()]).all()
    for name, p in tiny.trainable_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_p_next_attends_to_the_following_image(tiny_dir):
    config = FlamingoConfig(**json.loads((tiny_dir / "config.json").read_text()))
    config.p_next = 1.0
    model = Flamingo.from_config(config)
    set_gates(model)
    model.train()
    ids, mask = encode(model, ["intro <image> chunk zero words <EOC> <image> chunk one"])
    index = model.media_index(ids, torch.tensor([2]))[0].tolist()
    p0, p1 = (ids[0] == model.media_token_id).nonzero().flatten().tolist()
    # each <image> sees its own image; the text after image k sees image k+1; after the last image: nothing
    assert index == [0] * (p0 + 1) + [1] * (p1 - p0) + [-1] * (ids.shape[1] - p1 - 1)
    model.eval()  # the option is a training-time augmentation
    assert model.media_index(ids, torch.tensor([2]))[0, p0 + 1].item() == 0


# ---- training: frozen parts stay frozen ---------------------------------------------------------------------


def test_optimizer_step_moves_only_trainable(tiny):
    tiny.train()
    frozen = {n: p.detach().clone() for n, p in tiny.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in tiny.trainable_parameters()}
    assert frozen and trainable
    assert all(not n.startswith(("lm.", "vision.")) for n in trainable)
    optimizer = torch.optim.AdamW([p for _, p in tiny.trainable_parameters()], lr=1e-2)
    ids, mask = encode(tiny, ["<image> a caption <EOC> <image> another one <EOC>"])
    # two steps: at step 1 only the gates (and new rows) get gradient, since tanh(0) = 0 blocks the rest
    for _ in range(2):
        optimizer.zero_grad()
        tiny(ids, mask, images_for(1, 2), labels=ids).loss.backward()
        optimizer.step()
    for name, p in tiny.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
            assert p.grad is None
        else:
            assert not torch.equal(p, trainable[name]), f"trainable {name} did not move"


def test_video_frames_and_temporal_embeddings_get_gradient(tiny):
    set_gates(tiny)
    tiny.train()
    ids, mask = encode(tiny, ["<image> a clip of eight frames <EOC>"])
    video = images_for(1, 1, frames=8)
    visual = tiny.encode_media(video)
    assert visual.shape == (1, 1, tiny.config.num_latents, tiny.vision.dim)
    tiny(ids, mask, video, labels=ids).loss.backward()
    grad = tiny.resampler.temporal_embeddings.grad
    assert grad is not None and (grad.abs().flatten(1).amax(1) > 0).all()  # all 8 frame positions
    with pytest.raises(ValueError, match="max_frames"):
        tiny.encode_media(images_for(1, 1, frames=9))


def test_any_resolution_and_siglip(tmp_path, tiny):
    # CLIP tower at 48 px (trained at 32): positions interpolated, still R latents per image
    assert tiny.encode_media(images_for(2, 3, size=48)).shape == (
        2,
        3,
        tiny.config.num_latents,
        tiny.vision.dim,
    )
    lm, vision, tok = write_random_parts(tmp_path, LMShape(), VisionShape(family="siglip", patch=8), None)
    model = Flamingo.from_config(FlamingoConfig(lm=lm, vision=vision, tokenizer=tok, num_latents=4,
                                                resampler_depth=1, resampler_heads=2, resampler_head_dim=8))  # fmt: skip
    assert model.vision.image_config["mean"] == [0.5, 0.5, 0.5]
    assert model.vision(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)  # 4x4 patches, no CLS in SigLIP
    assert tiny.vision(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)  # CLIP: CLS dropped
    ids, mask = encode(model, ["<image> hi"])
    assert torch.isfinite(model(ids, mask, images_for(1, 1), labels=ids).loss)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_vision_towers_with_cls_and_register_tokens(tmp_path, family):
    """A plain ViT (CLS first) and DINOv2 with registers (CLS and 4 registers first): the encoder returns exactly
    the tower's patch tokens, in grid order."""
    lm, vision, tok = write_random_parts(tmp_path, LMShape(), VisionShape(family=family, patch=8), None)
    model = Flamingo.from_config(FlamingoConfig(lm=lm, vision=vision, tokenizer=tok, num_latents=4,
                                                resampler_depth=1, resampler_heads=2, resampler_head_dim=8))  # fmt: skip
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model.vision.model(pixel_values=pixels).last_hidden_state
    leading = 1 + getattr(model.vision.model.config, "num_register_tokens", 0)
    assert hidden.shape[1] == leading + 16 and leading == {"vit": 1, "dinov2": 5}[family]
    assert torch.equal(model.vision(pixels), hidden[:, leading:])  # 4x4 patches
    assert model.vision(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)  # another resolution: 6x6 patches
    ids, mask = encode(model, ["<image> hi"])
    assert torch.isfinite(model(ids, mask, images_for(1, 1), labels=ids).loss)


def test_gradient_checkpointing_same_loss_and_grads(tiny_dir):
    config = FlamingoConfig(**json.loads((tiny_dir / "config.json").read_text()))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config.gradient_checkpointing = checkpointing
        model = Flamingo.from_config(config)
        set_gates(model)
        model.train()
        ids, mask = encode(model, ["<image> a caption <EOC> <image> another"])
        grads.append(backward_grads(model, model(ids, mask, images_for(1, 2), labels=ids).loss))
    assert all(grad is not None for grad in grads[0].values())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


# ---- token ids beyond the LM's vocabulary ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> str:
    """A tokenizer without <image>/<EOC>/pad: load_tokenizer adds them after its vocabulary, i.e. beyond an LM
    whose vocabulary is the tokenizer's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = "a photo of a cat and a dog on the grass with some text about images".split()
    tok.train_from_iterator(
        [" ".join(words)] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    )
    path = tmp_path_factory.mktemp("small_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return str(path)


def test_new_token_ids_beyond_lm_vocab(tmp_path, small_tokenizer):
    from transformers import AutoTokenizer

    base_vocab = len(AutoTokenizer.from_pretrained(small_tokenizer))
    lm, vision, tok = write_random_parts(tmp_path, LMShape(vocab=base_vocab), VisionShape(), small_tokenizer)
    model = Flamingo.from_config(FlamingoConfig(lm=lm, vision=vision, tokenizer=tok, num_latents=4,
                                                resampler_depth=1, xattn_heads=2, xattn_head_dim=8))  # fmt: skip
    assert min(model.media_token_id, model.eoc_token_id, model.tokenizer.pad_token_id) >= base_vocab
    ids, mask = encode(model, ["a photo <image> of a cat <EOC>", "<image> dog"])  # left padding: pad ids
    assert (ids >= base_vocab).any()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, images_for(2, 1), labels=labels, return_logits=True)
    assert out.logits.shape[-1] == len(model.tokenizer) and torch.isfinite(out.loss)
    with torch.no_grad():
        assert torch.allclose(
            out.logits[..., :base_vocab][mask.bool()],
            bare_lm_logits(model, ids, mask)[mask.bool()],
            atol=1e-5,
        )
    # only two new rows are trained, each way: no full-vocabulary matrix among the trainable parameters
    new_rows = {n: p.shape for n, p in model.trainable_parameters() if n.startswith("new_tokens")}
    assert new_rows == {"new_tokens.input_rows": (2, 64), "new_tokens.output_rows": (2, 64)}
    out.loss.backward()
    assert model.new_tokens.output_rows.grad.abs().sum() > 0  # <EOC> is a target
    set_gates(model)
    assert_fused_loss_matches_full_logits(model, ids, mask, images_for(2, 1), labels)


def assert_fused_loss_matches_full_logits(
    model: Flamingo, ids, mask, images, labels, media_mask=None
) -> None:
    """The training loss without materialised logits (model/loss.py) equals cross-entropy over the full logits,
    in value and in every trainable gradient."""
    results = []
    for return_logits in (True, False):
        out = model(ids, mask, images, media_mask, labels=labels, return_logits=return_logits)
        assert (out.logits is None) != return_logits
        results.append((out.loss.item(), backward_grads(model, out.loss)))
    (full_loss, full_grads), (fused_loss, fused_grads) = results
    assert fused_loss == pytest.approx(full_loss, rel=1e-5)
    torch.testing.assert_close(fused_grads, full_grads, rtol=1e-4, atol=1e-7)  # None where the other is None
    assert full_grads["new_tokens.output_rows"].abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_loss_matches_full_logits(family, tmp_path):
    """New-token ids inside the LM's vocabulary (their columns replaced), ignored labels, tied (gpt2) and untied
    heads."""
    model = Flamingo.from_config(build_preset("tiny", tmp_path, family=family)).train()
    set_gates(model)
    ids, mask = encode(
        model, ["a photo <image> of a cat <EOC> and text", "<image> dog <EOC> <image> bird <EOC>"]
    )
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :3] = -100
    media_mask = torch.tensor([[True, False], [True, True]])
    assert_fused_loss_matches_full_logits(model, ids, mask, images_for(2, 2), labels, media_mask)


# ---- persistence ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_identical_logits(tiny, tmp_path):
    set_gates(tiny)
    with torch.no_grad():
        tiny.resampler.latents.add_(1.0)  # trained-looking weights, not the init
    tiny.save_pretrained(tmp_path / "ckpt")
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == tiny.config
    assert loaded.gate_values() == tiny.gate_values()
    ids, mask = encode(tiny, ["<image> a cat <EOC> <image> a dog"])
    images = images_for(1, 2)
    with torch.no_grad():
        assert torch.equal(tiny(ids, mask, images).logits, loaded(ids, mask, images).logits)
    weights = (tmp_path / "ckpt" / "trainable.safetensors").stat().st_size
    assert weights < 4 * sum(p.numel() for p in tiny.parameters()) / 2  # frozen parts are not copied


def test_from_pretrained_rejects_mismatched_weights(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "flamingo_config.json").read_text())
    config["resampler_depth"] += 1
    (tmp_path / "ckpt" / "flamingo_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        Flamingo.from_pretrained(tmp_path / "ckpt")


# ---- generation and scoring ----------------------------------------------------------------------------------


@pytest.fixture
def opened(tiny) -> Flamingo:
    set_gates(tiny)
    return tiny


def prompts(model: Flamingo):
    ids, mask = encode(model, ["<image> a photo of <EOC> <image> this is", "hello <image> see"])
    return ids, mask, images_for(2, 2), torch.tensor([[True, True], [True, False]])


def test_incremental_generation_equals_full_forward(opened):
    ids, mask, images, media_mask = prompts(opened)
    out = generate(opened, ids, mask, images, media_mask, max_new_tokens=6, eos_token_id=None)
    assert out.sequences.shape == (2, ids.shape[1] + 6)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = opened(out.sequences, full_mask, images, media_mask).logits
    for step, logits in enumerate(out.step_logits):
        assert torch.allclose(logits, full[:, ids.shape[1] - 1 + step], atol=1e-4), f"step {step}"
    # the greedy choice is the argmax of the full forward (never <image> nor pad); scores are its log-probs
    chosen = out.sequences[:, ids.shape[1] :]
    assert not (chosen == opened.media_token_id).any()
    banned = torch.tensor([opened.media_token_id, opened.tokenizer.pad_token_id])
    allowed = full[:, ids.shape[1] - 1 : -1].index_fill(-1, banned, -torch.inf)
    logprobs = torch.log_softmax(allowed, -1).gather(2, chosen[..., None])[..., 0]
    assert torch.allclose(out.scores, logprobs.sum(1), atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gpt_neox"])
def test_incremental_generation_other_families(family, tmp_path):
    model = Flamingo.from_config(build_preset("tiny", tmp_path, family=family)).eval()
    set_gates(model)
    ids, mask, images, media_mask = prompts(model)
    out = generate(model, ids, mask, images, media_mask, max_new_tokens=4, eos_token_id=None)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(out.sequences, full_mask, images, media_mask).logits
    for step, logits in enumerate(out.step_logits):
        assert torch.allclose(logits, full[:, ids.shape[1] - 1 + step], atol=1e-4), f"{family} step {step}"
    beams = generate(model, ids, mask, images, media_mask, max_new_tokens=3, num_beams=2, eos_token_id=None)
    assert beams.sequences.shape == (2, ids.shape[1] + 3)


def test_generation_encodes_media_once_and_caches_visual_kv(opened):
    calls = {"vision": 0, "to_kv": 0}
    opened.vision.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    for block in opened.xattn:
        block.attn.to_kv.register_forward_hook(lambda *a: calls.__setitem__("to_kv", calls["to_kv"] + 1))
    ids, mask, images, media_mask = prompts(opened)
    for beams in (1, 3):
        calls.update(vision=0, to_kv=0)
        generate(opened, ids, mask, images, media_mask, max_new_tokens=5, num_beams=beams, eos_token_id=None)
        assert calls == {"vision": 1, "to_kv": len(opened.xattn)}


def test_generation_stops_at_end_token(opened):
    ids, mask, images, media_mask = prompts(opened)
    first = generate(opened, ids, mask, images, media_mask, max_new_tokens=1, eos_token_id=None)
    end = first.sequences[0, -1].item()  # make row 0's first choice the end token
    out = generate(opened, ids, mask, images, media_mask, max_new_tokens=8, eos_token_id=end)
    assert out.sequences[0, ids.shape[1]].item() == end
    assert (out.sequences[0, ids.shape[1] + 1 :] == opened.tokenizer.pad_token_id).all()


def test_beam_search_returns_highest_scoring_beam(opened):
    ids, mask, images, media_mask = prompts(opened)
    beams = 3
    out = generate(
        opened, ids, mask, images, media_mask, max_new_tokens=2, num_beams=beams, eos_token_id=None
    )
    banned = [opened.media_token_id, opened.tokenizer.pad_token_id]
    for row in range(2):
        # exhaustively: the best two-token continuation among the `beams` best first tokens (what beam search
        # with this width must find), each scored by an independent full forward pass
        with torch.no_grad():
            first = torch.log_softmax(opened(ids[row : row + 1], mask[row : row + 1], images[row : row + 1],
                                             media_mask[row : row + 1]).logits[0, -1].index_fill(0, torch.tensor(banned), -torch.inf), -1)  # fmt: skip
            top = first.topk(beams).indices
            seqs = torch.cat([ids[row].repeat(beams, 1), top[:, None]], 1)
            seq_mask = torch.cat([mask[row].repeat(beams, 1), torch.ones(beams, 1, dtype=mask.dtype)], 1)
            second = opened(seqs, seq_mask, images[row].repeat(beams, 1, 1, 1, 1, 1), media_mask[row].repeat(beams, 1)).logits[:, -1]  # fmt: skip
            second = torch.log_softmax(second.index_fill(1, torch.tensor(banned), -torch.inf), -1)
        totals = first[top][:, None] + second  # [beams, vocab]
        best = totals.flatten().argmax()
        expected = [top[best // totals.shape[1]].item(), (best % totals.shape[1]).item()]
        assert out.sequences[row, ids.shape[1] :].tolist() == expected
        assert out.scores[row].item() == pytest.approx(totals.max().item() / 2, abs=1e-4)  # length_penalty 1


def test_beam_search_survives_every_beam_ending_at_once(opened):
    """One token dominates every position, so all beams want to end together: beam search must still find
    `beams` live continuations (a candidate pool of beams + len(end) once crashed here) and return the end."""
    ids, mask, images, media_mask = prompts(opened)
    end = 7

    def boost(module, args, output):
        output[..., end] += 30.0
        return output

    hook = opened.lm.get_output_embeddings().register_forward_hook(boost)
    try:
        out = generate(opened, ids, mask, images, media_mask, max_new_tokens=4, num_beams=3, eos_token_id=end)
    finally:
        hook.remove()
    assert out.sequences[:, ids.shape[1]].tolist() == [end, end]
    assert (out.sequences[:, ids.shape[1] + 1 :] == opened.tokenizer.pad_token_id).all()


def test_score_equals_full_forward_log_likelihood(opened):
    ids, mask = encode(opened, ["<image> a photo of a"])
    images = images_for(1, 1)[0]
    candidates = [opened.tokenizer(" cat").input_ids, opened.tokenizer(" very big dog").input_ids, [5]]
    scores = score(opened, ids, candidates, images)
    for candidate, got in zip(candidates, scores):
        seq = torch.cat([ids[0], torch.tensor(candidate)])[None]
        with torch.no_grad():
            logprobs = torch.log_softmax(opened(seq, None, images[None]).logits[0], -1)
        expected = sum(logprobs[ids.shape[1] - 1 + j, t] for j, t in enumerate(candidate))
        assert got.item() == pytest.approx(expected.item(), abs=1e-4)
    normalised = score(opened, ids, candidates, images, normalize=True)
    assert normalised[1].item() == pytest.approx(scores[1].item() / len(candidates[1]), abs=1e-5)
    with pytest.raises(ValueError, match="<image>"):
        score(opened, ids, [[opened.media_token_id]], images)


def test_prompts_scored_together_get_the_numbers_they_get_alone(opened):
    """score_prompts runs prompts of one length as one batch and every candidate of every prompt as another
    (right-padded to the longest candidate of all): each prompt's scores are bit for bit its own `score`."""
    texts = ["<image> a photo of a", "<image> the photo of a", "<image> a picture of a"]
    rows = [encode(opened, [text])[0] for text in texts]
    assert len({row.shape[1] for row in rows}) == 1, "the test needs prompts of one length"
    images = images_for(len(texts), 1, seed=3)
    candidates = [
        [opened.tokenizer(" cat").input_ids, opened.tokenizer(" very big dog").input_ids],
        [[5], opened.tokenizer(" red square on a table").input_ids, [9, 11]],
        [opened.tokenizer(" tree").input_ids],
    ]
    together = score_prompts(opened, torch.cat(rows), candidates, images)
    for row, image, options, got in zip(rows, images, candidates, together):
        assert torch.equal(got, score(opened, row, options, image))
    with pytest.raises(ValueError, match="one candidate per prompt"):
        score_prompts(opened, torch.cat(rows), candidates[:2], images)


# ---- torch.compile, CLI ----------------------------------------------------------------------------------------


def test_torch_compile_matches_eager(opened):
    ids, mask, images, media_mask = prompts(opened)
    with torch.no_grad():
        eager = opened(ids, mask, images, media_mask).logits
    # the hot path (resampler, gated blocks) compiles without graph breaks
    resampler = torch.compile(copy.deepcopy(opened.resampler), fullgraph=True, backend="eager")
    features = torch.randn(3, 2, 16, opened.vision.dim)
    assert torch.allclose(resampler(features), opened.resampler(features), atol=1e-5)
    block = torch.compile(copy.deepcopy(opened.xattn[0]), fullgraph=True, backend="eager")
    k, v = opened.xattn[0].attn.media_kv(torch.randn(2, 2, opened.config.num_latents, opened.vision.dim))
    x, index = torch.randn(2, 7, 64), torch.tensor([[-1, -1, 0, 0, 1, 1, 1]] * 2)
    assert torch.allclose(block(x, index, k, v), opened.xattn[0](x, index, k, v), atol=1e-5)
    # and the whole model runs compiled
    compiled = torch.compile(opened, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(ids, mask, images, media_mask).logits, eager, atol=1e-4)


def test_inductor_training_step_matches_eager(opened):
    """torch.compile's default backend (Inductor: generated kernels, here C++ on the CPU) through a whole training
    step, the fused loss's autograd.Function included: the same loss and the same gradient for every trainable
    parameter as eager."""
    ids, mask, images, media_mask = prompts(opened)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (opened, torch.compile(opened)):
        loss = model(ids, mask, images, media_mask, labels=labels).loss
        results.append((loss.item(), backward_grads(opened, loss)))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert all(grad is not None for grad in eager_grads.values())
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-4, atol=1e-6)


def test_cli_info_prints_parameter_counts(tiny):
    from m3w.cli import main

    result = CliRunner().invoke(main, ["model", "info", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    total = sum(p.numel() for p in tiny.parameters())
    trainable = sum(p.numel() for _, p in tiny.trainable_parameters())
    assert f"total: {total:,}  trainable: {trainable:,}" in result.output
    compact = CliRunner().invoke(main, ["model", "info", "--preset", "compact"])
    assert compact.exit_code == 0, compact.output
    assert "gated layers: [0, 4, 8, 12, 16, 20, 24, 28]" in compact.output
    assert CliRunner().invoke(main, ["model", "info", "--preset", "nope"]).exit_code != 0


def test_bench_script_reports_step_time():
    root = Path(__file__).resolve().parents[1]
    args = [
        "--preset",
        "tiny",
        "--batch",
        "1,2",
        "--tokens",
        "32",
        "--images",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "model_step.py"), *args, "--no-openflamingo"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"step_ms=\d+\.\d tokens_per_s=\d+", last), result.stdout
    assert re.findall(r"batch=(\d) ", result.stdout) == ["1", "2"]  # one block per batch size
    assert "floor" in result.stdout  # the CPU roofline line


def test_linear_cross_entropy_over_many_chunks(monkeypatch):
    """Several chunks with a ragged last one, ignored targets scattered among them, a biased head, a new row that
    replaces a head column, two beyond it and a pad id without a row: loss and gradients equal the full path."""
    import m3w.model.loss

    monkeypatch.setattr(m3w.model.loss, "CHUNK_ELEMENTS", (1, 1))  # the minimum: CHUNK_ALIGN rows per chunk
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50).requires_grad_(False)
    hidden = torch.randn(300, 16, generator=generator, requires_grad=True)
    rows = torch.randn(3, 16, generator=generator, requires_grad=True)
    row_ids, vocab_size = torch.tensor([5, 50, 51]), 53  # id 52: a pad id with no row
    targets = torch.randint(0, 52, (300,), generator=generator)
    targets[::7] = m3w.model.loss.IGNORE_INDEX
    targets[1:40:9] = 5
    targets[2:40:9] = 51
    assert len(targets) > 4 * m3w.model.loss.CHUNK_ALIGN

    fused = m3w.model.loss.linear_cross_entropy(hidden, head, rows, row_ids, vocab_size, targets)
    fused_grads = torch.autograd.grad(fused, (hidden, rows))
    logits = torch.nn.functional.pad(head(hidden), (0, vocab_size - 50), value=torch.finfo(torch.float32).min)
    logits = logits.index_copy(-1, row_ids, hidden @ rows.T)
    full = torch.nn.functional.cross_entropy(logits, targets, ignore_index=m3w.model.loss.IGNORE_INDEX)
    full_grads = torch.autograd.grad(full, (hidden, rows))

    assert fused.item() == pytest.approx(full.item(), rel=1e-6)
    for got, want in zip(fused_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    ignored = targets == m3w.model.loss.IGNORE_INDEX
    assert ignored.sum() > 30 and not fused_grads[0][ignored].any()


def test_precision_decides_the_autocast_inside_the_model(tiny):
    """Issue 13, defect 3: `precision: fp32` means full precision on CUDA too (the model used to enter bf16
    autocast on CUDA whatever the trainer asked). One decision, autocast_dtype, which the forward pass follows:
    checked on the CPU, where "bf16" is the only precision that autocasts."""
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    assert autocast_dtype("bf16", "cuda") == torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", "cuda")
    seen: list[tuple[str, bool]] = []
    for module in (tiny.resampler, tiny.lm):
        module.register_forward_hook(
            lambda m, i, o: seen.append((type(m).__name__, torch.is_autocast_enabled("cpu")))
        )
    ids, mask = encode(tiny, ["a photo <image> of a cat <EOC>"])
    for precision in ("auto", "fp32", "bf16"):
        seen.clear()
        tiny.precision = precision
        with torch.no_grad():
            tiny(ids, mask, images_for(1, 1), labels=ids, return_logits=True)
        assert {enabled for _, enabled in seen} == {precision == "bf16"}, (precision, seen)
        assert len(seen) == 2  # the resampler and the LM both ran


def test_bf16_frozen_parts_under_autocast(tiny_dir):
    """The GPU configuration (frozen LM and vision tower in bf16, trainable parts in fp32, bf16 autocast) run on
    the CPU: the fused loss agrees with the full-logits loss and with fp32, and every trainable part learns."""
    config = FlamingoConfig(**json.loads((tiny_dir / "config.json").read_text()))
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Flamingo.from_config(config, dtype=dtype).train()
        model.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        set_gates(model)
        assert {p.dtype for _, p in model.trainable_parameters()} == {torch.float32}
        ids, mask = encode(
            model, ["a photo <image> of a cat <EOC> and text", "<image> dog <EOC> <image> bird"]
        )
        labels = ids.masked_fill(mask == 0, -100)
        media_mask = torch.tensor([[True, False], [True, True]])
        for return_logits in (False, True):
            out = model(ids, mask, images_for(2, 2), media_mask, labels=labels, return_logits=return_logits)
            losses[dtype, return_logits] = out.loss.item()
            grads = backward_grads(model, out.loss)
            assert all(
                g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values()
            )
            assert (
                grads["new_tokens.output_rows"].abs().sum() > 0 and grads["resampler.latents"].abs().sum() > 0
            )
    assert losses[torch.bfloat16, False] == pytest.approx(losses[torch.bfloat16, True], rel=1e-3)
    assert losses[torch.bfloat16, False] == pytest.approx(losses[torch.float32, False], rel=5e-3)
