"""Qwen3-VL model: config, loading, and the full-sequence forward (vision encoder + text decoder)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import sharding
from pallas_kernels.common import resolve_attention_impl
from jaxlm.batching import bucket
from jaxlm.qwen3_vl.processor import preprocess_image
from jaxlm.qwen3_vl.text import TextConfig, init_cache, lm_head, rope_index, text_forward, text_step
from jaxlm.qwen3_vl.tokenizer import Tokenizer, load_tokenizer
from jaxlm.qwen3_vl.vision import VisionConfig, vision_forward, vision_metadata


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Qwen3VLConfig":
        if hf.get("model_type") != "qwen3_vl":
            raise ValueError(f"unknown model_type {hf.get('model_type')!r}: jaxlm.qwen3_vl reads 'qwen3_vl' checkpoints")
        text = hf["text_config"]
        tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return cls(text=TextConfig.from_hf(text, bool(tie)), vision=VisionConfig.from_hf(hf["vision_config"]),
                   image_token_id=hf["image_token_id"], video_token_id=hf["video_token_id"],
                   vision_start_token_id=hf["vision_start_token_id"], vision_end_token_id=hf["vision_end_token_id"])


@dataclasses.dataclass
class Qwen3VL:
    config: Qwen3VLConfig
    params: dict
    tokenizer: Tokenizer | None = None
    mesh: Mesh | None = None  # set by `shard`: params and caches laid out over it, every step runs under it
    # "pallas": vision attention and text prefill through sage_attention (INT8 Q.K^T), the default on a GPU;
    # "xla": dense XLA attention (the default on CPU; what the HF parity tests check)
    attention_impl: str | None = None

    @property
    def _impl(self) -> str:
        return resolve_attention_impl(self.attention_impl)

    def shard(self, mesh: Mesh) -> "Qwen3VL":
        """This model with its parameters laid out over `mesh` (jaxlm.sharding.make_mesh) by the Qwen3-VL table in
        jaxlm/sharding.py; `forward` and `generate` then run tensor/data parallel under that mesh."""
        params = sharding.shard(self.params, sharding.qwen3_vl_specs(self.config, mesh), mesh)
        return dataclasses.replace(self, params=params, mesh=mesh)

    def generate(self, prompts: list[str], images=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, on_token=None) -> list[str]:
        """Text in, text out: prompts [B] strings; images None, or per prompt None / one image / a list of images
        (PIL, path or array). Each prompt is rendered with the Qwen chat template. `on_token(row, text_so_far)`
        streams. Returns the generated text per prompt (special tokens dropped)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer or load_tokenizer(None)
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries: give one entry per prompt")
        ids, vision = [], []
        m2 = self.config.vision.spatial_merge_size ** 2
        vision_ids = (self.config.vision_start_token_id, self.config.image_token_id, self.config.vision_end_token_id)
        for text, imgs in zip(prompts, images):
            imgs = [] if imgs is None else (list(imgs) if isinstance(imgs, (list, tuple)) else [imgs])
            pre = [preprocess_image(im, patch_size=self.config.vision.patch_size,
                                    merge_size=self.config.vision.spatial_merge_size,
                                    temporal_patch_size=self.config.vision.temporal_patch_size) for im in imgs]
            ids.append(tok.chat(text, [int(np.prod(g)) // m2 for _, g in pre], vision_ids))
            vision.append(pre or None)
        stop = tuple(tok.ids[n] for n in ("<|im_end|>", "<|endoftext|>") if n in tok.ids)
        stream = None if on_token is None else (lambda r, toks: on_token(r, tok.decode(toks)))
        out = self.generate_tokens(ids, vision, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed, stop_tokens=stop, on_step=stream)
        return [tok.decode(o) for o in out]

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Logits [B, T, vocab] over full sequences (no cache), HF's layout of pixel_values / image_grid_thw."""
        cfg = self.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values needs image_grid_thw")
        grids = [] if pixel_values is None else [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw)]
        positions, _ = rope_index(cfg.vision.spatial_merge_size, input_ids, cfg.image_token_id, cfg.video_token_id,
                                  image_grid_thw)
        with sharding.use(self.mesh):
            embeds, visual_mask, deepstack = self._embed(input_ids, pixel_values, grids)
            return text_forward(self.params["text"], cfg.text, embeds, jnp.asarray(positions),
                                jnp.asarray(visual_mask), tuple(deepstack), self._impl)


    def _embed(self, ids: np.ndarray, pixel_values, grids):
        """Embeddings [*ids.shape, D] with the images' merged patches at the image tokens (in order), the visual
        mask and the DeepStack rows; the one place vision features enter the text stream."""
        cfg = self.config
        embeds = self.params["text"]["embed"][jnp.asarray(ids)]
        mask = ids == cfg.image_token_id
        if not grids:
            if mask.any():
                raise ValueError("image tokens in the prompt but no image was given")
            return embeds, mask, ()
        merged, deepstack, _ = _vision_jit(self.params["vision"], cfg.vision, jnp.asarray(pixel_values),
                                           vision_metadata(cfg.vision, grids), self._impl)
        if merged.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(mask.sum())} image tokens in the prompt but its images give {merged.shape[0]} "
                             "merged patches")
        flat = embeds.reshape(-1, embeds.shape[-1]).at[jnp.asarray(np.flatnonzero(mask))].set(merged.astype(embeds.dtype))
        return flat.reshape(embeds.shape), mask, tuple(deepstack)

    def generate_tokens(self, prompts: list, images: list | None = None, **kwargs):
        """Token-level generation for a batch of prompts of different lengths (see `_generate_tokens`); under the
        model's mesh when it has one."""
        with sharding.use(self.mesh):
            return self._generate_tokens(prompts, images, **kwargs)

    def _generate_tokens(self, prompts: list, images: list | None = None, *, max_new_tokens: int = 32,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                         stop_tokens=(151645, 151643), return_logits: bool = False, on_step=None):
        """Token-level generation for a batch of prompts of different lengths.

        prompts: list of token-id lists; images: per prompt, a list of (pixel_values [n, 1536], grid_thw) or
        None. Prefill runs per prompt (its images and DeepStack rows differ), into one shared KV cache; decode
        steps run batched and jitted with the cache donated; sampling: greedy (temperature 0), temperature,
        top-k, top-p. Returns the new tokens per prompt (and the per-step logits [steps, B, V] when asked)."""
        cfg, b = self.config, len(prompts)
        if b == 0:
            raise ValueError("no prompts given")
        images = images or [None] * b
        lengths = np.array([len(p) for p in prompts])
        if (lengths == 0).any():
            raise ValueError(f"prompt {int(np.argmin(lengths))} is empty")
        limit = cfg.text.max_position_embeddings
        if lengths.max() + max_new_tokens > limit:
            i = int(np.argmax(lengths))
            raise ValueError(f"prompt {i} has {int(lengths[i])} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"over the model's {limit} positions: shorten the prompt or lower max_new_tokens")
        dtype = self.params["text"]["embed"].dtype
        cache = init_cache(cfg.text, b, bucket(int(lengths.max()) + max_new_tokens, 64), dtype, self.mesh)
        deltas, last = np.zeros(b, np.int64), []
        for r, ids in enumerate(prompts):
            ids = np.asarray(ids)[None]
            pix = np.concatenate([p for p, _ in images[r]]) if images[r] else None
            grids = [tuple(int(v) for v in np.asarray(g).reshape(-1)) for _, g in images[r]] if images[r] else []
            embeds, mask, deepstack = self._embed(ids[0], pix, grids)
            pos, delta = rope_index(cfg.vision.spatial_merge_size, ids, cfg.image_token_id, cfg.video_token_id,
                                    grids or None)
            deltas[r] = delta[0]
            t_pad = bucket(ids.shape[1], 16)
            pad = t_pad - ids.shape[1]
            embeds = jnp.pad(embeds, ((0, pad), (0, 0)))[None]
            pos = np.pad(pos, ((0, 0), (0, 0), (0, pad)))
            mask = np.pad(mask, (0, pad))[None]
            logits, cache = prefill_step(self.params["text"], cfg.text, embeds, jnp.asarray(pos), cache, jnp.int32(r),
                                         jnp.int32(ids.shape[1] - 1), jnp.asarray(mask), deepstack, impl=self._impl)
            last.append(logits)
        logits = jnp.stack(last)
        key, sub = jax.random.split(jax.random.key(seed))
        tokens = _sample(logits, sub, temperature, top_k, top_p)
        out, steps_logits = [[] for _ in range(b)], []
        done = np.zeros(b, bool)
        cache_len = jnp.asarray(lengths, jnp.int32)
        delta = jnp.asarray(deltas, jnp.int32)
        for step in range(max_new_tokens):
            # queue the next step before reading this one's tokens, so the host work overlaps the GPU's
            ahead = None
            if step < max_new_tokens - 1:
                ahead = _decode_and_sample(self.params["text"], cfg.text, tokens, cache, cache_len, delta, key,
                                           temperature, top_k, top_p)
            if return_logits:
                steps_logits.append(np.asarray(logits))
            host = np.asarray(tokens)
            for r in range(b):
                if not done[r]:
                    out[r].append(int(host[r]))
                    done[r] = int(host[r]) in stop_tokens
                    if on_step is not None:
                        on_step(r, out[r])
            if ahead is None or done.all():
                break
            tokens, logits, cache, cache_len, key = ahead
        return (out, np.stack(steps_logits)) if return_logits else out


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _vision_jit(params, cfg, pixel_values, meta, impl):
    return vision_forward(params, cfg, pixel_values, meta, impl)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def prefill_step(params, cfg, embeds, positions, cache, row, last, visual_mask, deepstack, impl="xla"):
    """Prefill one prompt into batch row `row` (traced) of the KV cache, rows 0.. of its sequence.

    params/cfg: the text model's (`model.params["text"]`, `model.config.text`); embeds [1, T, D] (pad T freely);
    positions [3, 1, T] MRoPE (t, h, w); cache from `text.init_cache` (donated); last: the index of the prompt's last
    real token; visual_mask [1, T] bool and deepstack (tuple of [n_visual, D]) for images, else False / ();
    impl "xla" or "pallas" (attention through sage_attention).
    Returns (logits [V] float32 at `last`, cache). Compiled once per (T, image-token count), not per prompt."""
    one = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, row, 1, axis=0), cache)
    hidden, one = text_step(params, cfg, embeds, positions, one, jnp.zeros((1,), jnp.int32), visual_mask, deepstack,
                            impl)
    cache = jax.tree.map(lambda c, o: jax.lax.dynamic_update_slice_in_dim(c, o, row, axis=0), cache, one)
    return lm_head(params, cfg, jax.lax.dynamic_index_in_dim(hidden[0], last, keepdims=False)), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params, cfg, tokens, cache, cache_len, delta):
    """One new token per request: tokens [B] int32 go to cache row cache_len[b] at MRoPE position
    cache_len[b] + delta[b] on all 3 axes (delta from `rope_index`; 0 for text-only prompts).
    Returns (logits [B, V] float32, cache); the cache is donated."""
    embeds = params["embed"][tokens][:, None]
    positions = jnp.broadcast_to((cache_len + delta)[None, :, None], (3, tokens.shape[0], 1))
    hidden, cache = text_step(params, cfg, embeds, positions, cache, cache_len)
    return lm_head(params, cfg, hidden[:, 0]), cache


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_k", "top_p"), donate_argnames=("cache",))
def _decode_and_sample(params, cfg, tokens, cache, cache_len, delta, key, temperature, top_k, top_p):
    """`decode_step` then sampling, one dispatch per generated token: (next tokens, logits, cache, cache_len + 1,
    key); the tokens stay on the device so the host can queue the following step before reading them."""
    logits, cache = decode_step(params, cfg, tokens, cache, cache_len, delta)
    key, sub = jax.random.split(key)
    return _sample(logits, sub, temperature, top_k, top_p), logits, cache, cache_len + 1, key


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _sample(logits, key, temperature, top_k, top_p):
    """Greedy when temperature == 0; else temperature, then top-k, then top-p (nucleus) filtering."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def load(path, dtype=None) -> Qwen3VL:
    """An HF Qwen3-VL directory (safetensors) -> Qwen3VL with `.config` and `.params` (dtype: checkpoint's float
    dtype by default)."""
    from convert import qwen3_vl as conv  # the layout mapping lives in the converter

    return conv.load_hf(Path(path), dtype=dtype)
