"""The R-Capsule wrapper around a Hugging Face causal LM (Shan et al., arXiv 2509.22131).

K learned query tokens are appended after the question. Their last-layer hidden states pass a linear bottleneck
d -> r -> d (the paper's minimality pressure) and become the capsule: K vectors in the embedding space. Two passes
use it:

- task pass: `[question; capsule; execution steps; answer]` through `inputs_embeds`, loss on the tokens after the
  capsule only;
- reconstruction pass: `[capsule; plan]` with NO question tokens, teacher-forced, loss on the plan tokens
  (sufficiency: the capsule alone must carry the plan).

Generation builds the capsule once, reuses the question's KV cache for the task pass, and decodes greedily.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .config import TINY_MODELS, TINY_PREFIX, CapsuleModelConfig
from .data import CapsuleBatch

CAPSULE_WEIGHTS = "capsule.safetensors"
CAPSULE_CONFIG = "capsule_config.json"
MODEL_WEIGHTS = "model.safetensors"
ADAPTER_DIR = "adapter"


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding shifts real tokens right; positions must count real tokens only, as HF generate does.
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _segment_loss(logits: torch.Tensor, start: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of the segment `ids` whose first token sits at column `start` of the input."""
    pred = logits[:, start - 1 : start - 1 + ids.shape[1]]
    labels = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), labels.reshape(-1), ignore_index=-100)


class CapsuleModel(nn.Module):
    """A causal LM (optionally a `PeftModel`) plus capsule queries and bottleneck.

    Args:
        lm (`transformers.PreTrainedModel` or `peft.PeftModel`): The wrapped causal LM.
        num_capsule_tokens (`int`): K, the number of capsule vectors.
        bottleneck_rank (`int`): r of the d -> r -> d bottleneck.

    The capsule parameters are kept in float32 and cast to the LM's dtype when used.
    """

    def __init__(self, lm: nn.Module, num_capsule_tokens: int = 2, bottleneck_rank: int = 32):
        super().__init__()
        self.lm = lm
        emb = lm.get_input_embeddings()
        d = emb.weight.shape[1]
        emb_std = float(emb.weight.detach().float().std())
        self.num_capsule_tokens = num_capsule_tokens
        self.bottleneck_rank = bottleneck_rank
        import inspect

        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # PEFT forwards the kwarg unchanged
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        # Queries start at the scale of real token embeddings so the first forward looks like ordinary text.
        self.capsule_queries = nn.Parameter(torch.randn(num_capsule_tokens, d) * emb_std)
        self.down = nn.Linear(d, bottleneck_rank, bias=False)
        self.up = nn.Linear(bottleneck_rank, d, bias=False)
        # Final hidden states are ~unit RMS after the last norm; the default `down` keeps ~1/sqrt(3) of that, so
        # this std makes the capsule start at embedding scale instead of dwarfing the question embeddings.
        nn.init.normal_(self.up.weight, std=emb_std * math.sqrt(3.0 / bottleneck_rank))

    # ------------------------------------------------------------------ helpers

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.capsule_queries.device

    def capsule_parameters(self) -> list[nn.Parameter]:
        """The parameters that exist only because of the capsule (queries and bottleneck)."""
        return [self.capsule_queries, self.down.weight, self.up.weight]

    def capsule_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _lm(self, embeds, mask, past=None, past_mask=None, use_cache=False, output_hidden_states=False, keep=0):
        """One LM call; `keep > 0` computes logits for the last `keep` positions only (`logits_to_keep`).

        The LM head is a d x vocab matmul per position (49k columns for SmolLM2), and the prompt and capsule
        positions never need logits, so skipping them saves a large share of a CPU step. Models whose forward
        has no `logits_to_keep` get full logits; callers slice the last `keep` themselves either way.
        """
        full_mask = mask if past_mask is None else torch.cat([past_mask, mask], dim=1)
        extra = {"logits_to_keep": keep} if keep and self._has_logits_to_keep else {}
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            position_ids=_positions(full_mask)[:, -embeds.shape[1] :],
            past_key_values=past,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **extra,
        )

    def _tail_loss(self, embeds, mask, ids: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
        """Next-token loss of the segment `ids` that ends `embeds`; logits only for that segment (and the one
        position before it, which predicts its first token)."""
        keep = ids.shape[1] + 1
        logits = self._lm(embeds, mask, keep=keep).logits[:, -keep:]
        return _segment_loss(logits, 1, ids, ids_mask)

    # ------------------------------------------------------------------ capsule

    def build_capsule(
        self,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
    ):
        """Capsule from a left-padded question batch.

        Args:
            prompt_ids (`torch.LongTensor` of shape `(B, P)`): Question prompt ids (or give `inputs_embeds`).
            prompt_mask (`torch.LongTensor` of shape `(B, P)`): 1 on real tokens.
            inputs_embeds (`torch.Tensor` of shape `(B, P, d)`, *optional*): Question embeddings instead of ids.
            use_cache (`bool`): Also return the question's KV cache (queries cropped off) for generation.

        Returns:
            `(capsule, cache)`: capsule of shape `(B, K, d)` in the LM dtype; `cache` is `None` unless `use_cache`.
        """
        q = self.embed(prompt_ids) if inputs_embeds is None else inputs_embeds
        B, K = q.shape[0], self.num_capsule_tokens
        queries = self.capsule_queries.to(q.dtype).unsqueeze(0).expand(B, K, -1)
        ones = prompt_mask.new_ones(B, K)
        cache = None
        if use_cache:
            # Question first, then the queries on top of its cache; cropping the queries off leaves exactly the
            # question's cache, which the task pass continues from with the capsule.
            cache = self._lm(q, prompt_mask, use_cache=True, keep=1).past_key_values
            out = self._lm(
                queries, ones, past=cache, past_mask=prompt_mask, use_cache=True, output_hidden_states=True, keep=1
            )
            cache.crop(-K)
        else:
            out = self._lm(
                torch.cat([q, queries], 1), torch.cat([prompt_mask, ones], 1), output_hidden_states=True, keep=1
            )
        hidden = out.hidden_states[-1][:, -K:].float()
        capsule = self.up(self.down(hidden)).to(q.dtype)
        return capsule, cache

    # ------------------------------------------------------------------ losses

    def task_loss(self, batch: CapsuleBatch, capsule: torch.Tensor) -> torch.Tensor:
        """Loss on the target tokens of `[question; capsule; target]` (question and capsule positions carry none)."""
        B, K = batch.prompt_ids.shape[0], capsule.shape[1]
        embeds = torch.cat([self.embed(batch.prompt_ids), capsule, self.embed(batch.target_ids)], 1)
        mask = torch.cat([batch.prompt_mask, batch.prompt_mask.new_ones(B, K), batch.target_mask], 1)
        return self._tail_loss(embeds, mask, batch.target_ids, batch.target_mask)

    def reconstruction_logits(self, capsule: torch.Tensor, plan_ids: torch.Tensor, plan_mask: torch.Tensor):
        """Logits of `[capsule; plan]`; the question is not an input, so only the capsule can inform the plan."""
        B, K = capsule.shape[:2]
        embeds = torch.cat([capsule, self.embed(plan_ids)], 1)
        mask = torch.cat([plan_mask.new_ones(B, K), plan_mask], 1)
        return self._lm(embeds, mask).logits

    def reconstruction_loss(self, capsule: torch.Tensor, plan_ids: torch.Tensor, plan_mask: torch.Tensor):
        B, K = capsule.shape[:2]
        embeds = torch.cat([capsule, self.embed(plan_ids)], 1)
        mask = torch.cat([plan_mask.new_ones(B, K), plan_mask], 1)
        return self._tail_loss(embeds, mask, plan_ids, plan_mask)

    def text_loss(self, batch: CapsuleBatch) -> torch.Tensor:
        """Plain LM loss on `[question; target]` (stage 1: no capsule)."""
        embeds = torch.cat([self.embed(batch.prompt_ids), self.embed(batch.target_ids)], 1)
        mask = torch.cat([batch.prompt_mask, batch.target_mask], 1)
        return self._tail_loss(embeds, mask, batch.target_ids, batch.target_mask)

    def capsule_losses(self, batch: CapsuleBatch, recon_lambda: float = 1.0) -> dict[str, torch.Tensor]:
        """Stage 2 objective: `loss = task_loss + recon_lambda * recon_loss`.

        With `recon_lambda == 0` the reconstruction pass is skipped (the lambda = 0 control) and `recon_loss` is
        reported as NaN.
        """
        capsule, _ = self.build_capsule(batch.prompt_ids, batch.prompt_mask)
        task = self.task_loss(batch, capsule)
        if recon_lambda > 0:
            recon = self.reconstruction_loss(capsule, batch.plan_ids, batch.plan_mask)
            loss = task + recon_lambda * recon
        else:
            recon, loss = torch.full_like(task, float("nan")), task
        return {"loss": loss, "task_loss": task, "recon_loss": recon}

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def _greedy(
        self, embeds, mask, max_new_tokens: int, eos_id: int, past=None, past_mask=None, use_cache: bool = True
    ) -> list[list[int]]:
        """Greedy continuation of `embeds`; returns each row's tokens up to (not including) eos."""
        if past is not None and not use_cache:
            raise ValueError("a past cache needs use_cache=True")
        B = embeds.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=embeds.device)
        rows: list[list[int]] = [[] for _ in range(B)]
        full_mask = mask if past_mask is None else torch.cat([past_mask, mask], 1)
        seq = embeds
        out = self._lm(embeds, mask, past=past, past_mask=past_mask, use_cache=use_cache, keep=1)
        for step in range(max_new_tokens):
            tok = out.logits[:, -1].argmax(-1)
            ids = tok.tolist()  # one device sync per step, not one per row
            for i in torch.nonzero(~done).flatten().tolist():
                if ids[i] == eos_id:
                    done[i] = True
                else:
                    rows[i].append(ids[i])
            if done.all() or step == max_new_tokens - 1:
                break
            new = self.embed(tok[:, None])
            full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], 1)
            if use_cache:
                out = self._lm(
                    new, full_mask[:, -1:], past=out.past_key_values, past_mask=full_mask[:, :-1], use_cache=True
                )
            else:
                seq = torch.cat([seq, new], 1)
                out = self._lm(seq, full_mask, keep=1)
        return rows

    @torch.no_grad()
    def generate(
        self,
        prompt_ids,
        prompt_mask,
        max_new_tokens: int,
        eos_id: int,
        capsule: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Execution + answer after `[question; capsule]`, greedy, stopping at eos (call `model.eval()` first).

        Args:
            capsule (`torch.Tensor` of shape `(B, K, d)`, *optional*): Use this capsule instead of building one from
                the question (the zeroed / shuffled controls).
            use_cache (`bool`): Decode with the KV cache (the default) or recompute the full sequence every step.

        Returns:
            `(tokens, capsule)`: generated ids per row (eos excluded) and the capsule that was used.
        """
        q = self.embed(prompt_ids)
        if capsule is None:
            capsule, cache = self.build_capsule(inputs_embeds=q, prompt_mask=prompt_mask, use_cache=use_cache)
        else:
            cache = self._lm(q, prompt_mask, use_cache=True, keep=1).past_key_values if use_cache else None
        ones = prompt_mask.new_ones(capsule.shape[:2])
        if use_cache:
            rows = self._greedy(capsule, ones, max_new_tokens, eos_id, past=cache, past_mask=prompt_mask)
        else:
            rows = self._greedy(
                torch.cat([q, capsule], 1), torch.cat([prompt_mask, ones], 1), max_new_tokens, eos_id, use_cache=False
            )
        return rows, capsule

    @torch.no_grad()
    def decode_plan(self, capsule: torch.Tensor, max_new_tokens: int, eos_id: int, use_cache: bool = True):
        """Greedy plan text ids from the capsule alone (what the reconstruction pass was trained to produce)."""
        ones = torch.ones(capsule.shape[:2], dtype=torch.long, device=capsule.device)
        return self._greedy(capsule, ones, max_new_tokens, eos_id, use_cache=use_cache)

    @torch.no_grad()
    def generate_text(self, prompt_ids, prompt_mask, max_new_tokens: int, eos_id: int, use_cache: bool = True):
        """Plain greedy continuation of a token prompt (the full-CoT and no-CoT controls)."""
        return self._greedy(self.embed(prompt_ids), prompt_mask, max_new_tokens, eos_id, use_cache=use_cache)


# ---------------------------------------------------------------------------------------------- build / save / load


def load_base(cfg: CapsuleModelConfig, seed: int = 0):
    """`(lm, tokenizer)` for `cfg.model`; never downloads.

    `tiny-*` names build a random model of `tiny_hidden_size` x `tiny_num_layers` here (the package loader's tiny
    models have one fixed size). Every other spec (a registry name such as `smollm2-135m-instruct`, a `.gguf` file,
    a local Hugging Face folder) goes through `alignguard.models.load_model_and_tokenizer`, the loader every other
    command uses, so `--model` means the same thing everywhere.

    Raises:
        `ModelLoadError`: the spec is unknown, missing or broken; the message starts with `--model SPEC:`.
    """
    if cfg.model in TINY_MODELS:
        from alignguard.tiny import make_tiny_model, make_tiny_tokenizer

        family = cfg.model[len(TINY_PREFIX) :]
        lm = make_tiny_model(
            family,
            hidden_size=cfg.tiny_hidden_size,
            num_layers=cfg.tiny_num_layers,
            intermediate_size=2 * cfg.tiny_hidden_size,
            seed=seed,
        )
        tokenizer = make_tiny_tokenizer()
    else:
        from alignguard.models import ModelLoadError, load_model_and_tokenizer

        try:
            lm, tokenizer, _ = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype)
        except ModelLoadError as exc:
            raise ModelLoadError(f"--model {cfg.model}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = lm.to(getattr(torch, cfg.dtype))
    return lm, tokenizer


def build_capsule_model(cfg: CapsuleModelConfig, seed: int = 0):
    """`(CapsuleModel, tokenizer)`; with `cfg.lora_r > 0` the LM becomes a `PeftModel` with only LoRA trainable."""
    lm, tokenizer = load_base(cfg, seed)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"
        )
        lm = get_peft_model(lm, lora)
    torch.manual_seed(seed)  # capsule init must not depend on how many random numbers the loader used
    model = CapsuleModel(lm, cfg.num_capsule_tokens, cfg.bottleneck_rank)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer


def is_peft(model: CapsuleModel) -> bool:
    return hasattr(model.lm, "peft_config")


def save_weights(model: CapsuleModel, out_dir: str | Path) -> None:
    """Write the capsule params (`capsule.safetensors`) and the LM's trainable part.

    The LM part is a PEFT adapter folder (`adapter/`, loadable by `PeftModel.from_pretrained`) when LoRA is used,
    else the full LM state in `model.safetensors`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.capsule_state_dict(), str(out / CAPSULE_WEIGHTS))
    (out / CAPSULE_CONFIG).write_text(
        json.dumps({"num_capsule_tokens": model.num_capsule_tokens, "bottleneck_rank": model.bottleneck_rank})
    )
    if is_peft(model):
        model.lm.save_pretrained(str(out / ADAPTER_DIR))
    else:
        save_model(model.lm, str(out / MODEL_WEIGHTS))  # handles tied embeddings, unlike save_file


def load_weights(model: CapsuleModel, ckpt_dir: str | Path) -> None:
    """Load what `save_weights` wrote into a model built with the same config (in place)."""
    ckpt = Path(ckpt_dir)
    state = load_file(str(ckpt / CAPSULE_WEIGHTS), device=str(model.device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("lm.")] + list(unexpected)
    if bad:
        raise ValueError(f"{ckpt / CAPSULE_WEIGHTS}: capsule weights do not match the model: {bad}")
    if is_peft(model):
        from peft import set_peft_model_state_dict

        adapter = ckpt / ADAPTER_DIR / "adapter_model.safetensors"
        set_peft_model_state_dict(model.lm, load_file(str(adapter), device=str(model.device)))
    else:
        load_model(model.lm, str(ckpt / MODEL_WEIGHTS), device=str(model.device))
