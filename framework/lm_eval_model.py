"""Our GPT and tokenizer as an lm-evaluation-harness model (used by framework.evaluate).

Kept apart from framework.evaluate because importing lm_eval takes seconds: the entry point's
config is composed by tests that never evaluate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from framework.config import ConfigError


class FrameworkLM(TemplateLM):
    """Our GPT and tokenizer as an lm-eval model. TemplateLM (an lm_eval.api.model.LM) splits
    (context, continuation) into token ids the way lm-eval's own causal models do (a trailing
    space of the context moves to the continuation; an empty context is our end-of-text)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_gen_tokens: int = 256, device="cpu"):
        super().__init__()
        self.model = model.to(device).eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.max_gen_tokens = max_gen_tokens
        self._device = torch.device(device)
        self.block_size = model.cfg.block_size

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # our tokenizers add no special tokens

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation), context_ids, continuation_ids) -> for each, the
        summed log-probability of the continuation and whether greedy decoding produces it."""
        out: list[tuple[float, bool]] = []
        for i in range(0, len(requests), self.batch_size):
            out += self._score_batch([(c, x) for _, c, x in requests[i : i + self.batch_size]])
        for (pair, _, _), res in zip(requests, out, strict=True):
            if pair is not None:  # None: a window of loglikelihood_rolling, cached as a whole
                self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = []
        for ctx, cont in pairs:
            if not 1 <= len(cont) <= self.block_size:
                raise ConfigError(
                    f"a continuation of {len(cont)} tokens cannot be scored by a model with "
                    f"model.block_size={self.block_size}; use shorter answers"
                )
            # The last block_size tokens in, each predicting its successor; context is cut on
            # the left if it must be (as lm-eval's own causal models do).
            rows.append((ctx + cont)[-(self.block_size + 1) :][:-1])
        width = max(len(r) for r in rows)
        # Right padding: a causal model's positions never see tokens to their right.
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
        logprobs = F.log_softmax(self.model(ids.to(self._device)).float(), dim=-1).cpu()  # (B, T, V)
        results = []
        for b, ((_, cont), r) in enumerate(zip(pairs, rows, strict=True)):
            lp = logprobs[b, len(r) - len(cont) : len(r)]  # (len(cont), V)
            target = torch.tensor(cont)
            total = float(lp.gather(1, target[:, None]).sum())
            results.append((total, bool((lp.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's full log-likelihood after an end-of-text, in block_size windows that
        predict every token exactly once."""
        out = []
        for (text,) in [req.args for req in requests]:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, self.block_size, 1
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, x) for c, x in windows])
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache: evaluation answers are short) until a stop string,
        end-of-text or max_gen_toks."""
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kw = dict(gen_kwargs)
            if kw.get("do_sample") or kw.get("temperature", 0) > 0:
                raise ConfigError(
                    "this task samples (do_sample/temperature in its generation_kwargs); "
                    "framework.evaluate decodes greedily only: set do_sample: false"
                )
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_tokens))
            ids = self.tok_encode(context) or [self.eot_token_id]
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                ctx = torch.tensor([(ids + new)[-self.block_size :]], device=self._device)
                nxt = int(self.model(ctx)[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                if any(s in text for s in until):
                    break
            for s in until:
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
