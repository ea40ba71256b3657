"""The executor's matchers: built from a setup's accepted tokens, a bitmask per sub-step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmill.core.executor_state import SeqView
from tokenmill.core.plan import ScheduledSeq, SeqSetup
from tokenmill.core.request import SamplingParams
from tokenmill.model.sampler import unpack_token_bitmask
from tokenmill.structured.decoding import SequenceGrammar, StepMasks
from tokenmill.structured.params import StructuredOutputsParams as Spec


def _setup(compiler: Any, tokenizer: Any, spec: Spec, outputs: str = "") -> SeqSetup:
    params = SamplingParams(structured_outputs=compiler.compile(spec))
    return SeqSetup([1, 2], tokenizer(outputs, add_special_tokens=False)["input_ids"] if outputs else [], params, (0, 4))


def _allowed(mask: torch.Tensor, row: int, tokenizer: Any) -> set[str]:
    ids = unpack_token_bitmask(mask[row : row + 1], 4096)[0].nonzero()[:, 0].tolist()
    return {tokenizer.decode([t]) for t in ids}


def test_a_readmitted_sequence_resumes_where_its_tokens_left_it(compiler: Any, bundled_tokenizer: Any) -> None:
    spec = Spec(choice=["alpha", "beta"])
    fresh = SequenceGrammar.for_setup(_setup(compiler, bundled_tokenizer, spec))
    resumed = SequenceGrammar.for_setup(_setup(compiler, bundled_tokenizer, spec, "alp"))
    assert fresh is not None and resumed is not None and resumed.num_tokens > 0
    masks = StepMasks(4096)
    mask, constrained = masks.fill([fresh, None, resumed])
    assert constrained == [True, False, True] and mask is not None
    assert {"a", "b"} <= {t[:1] for t in _allowed(mask, 0, bundled_tokenizer)}
    assert all("ha".startswith(t) for t in _allowed(mask, 2, bundled_tokenizer))  # only the rest of "alpha"


def test_tokens_that_do_not_fit_are_refused(compiler: Any, bundled_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="does not fit the grammar"):
        SequenceGrammar.for_setup(_setup(compiler, bundled_tokenizer, Spec(regex="[0-9]+"), "abc"))
    g = SequenceGrammar.for_setup(_setup(compiler, bundled_tokenizer, Spec(regex="[0-9]+")))
    assert g is not None and not g.accept(bundled_tokenizer.convert_tokens_to_ids("a"))


def test_after_eos_a_row_is_unconstrained(compiler: Any, bundled_tokenizer: Any) -> None:
    g = SequenceGrammar.for_setup(_setup(compiler, bundled_tokenizer, Spec(choice=["yes"]), "yes"))
    assert g is not None
    mask, constrained = StepMasks(4096).fill([g])
    assert constrained == [True] and _allowed(mask, 0, bundled_tokenizer) == {"<|endoftext|>", "<|end|>"}
    assert g.accept(4) and g.terminated
    assert StepMasks(4096).fill([g]) == (None, [False])
    assert not g.accept(5)  # tokens sampled past the end go nowhere


def test_admission_builds_matchers_only_for_structured_sequences(compiler: Any, bundled_tokenizer: Any) -> None:
    setups = [_setup(compiler, bundled_tokenizer, Spec(regex="a+")), SeqSetup([1], [], SamplingParams(), (0,))]
    seqs = [ScheduledSeq(f"r{i}", 0, 1, [1], 0, [0], True, s) for i, s in enumerate(setups)]
    views = [SeqView(s, []) for s in setups]
    StepMasks.admit(seqs, views)
    assert isinstance(views[0].grammar, SequenceGrammar) and views[1].grammar is None
    uncompiled = SeqSetup([1], [], SamplingParams(structured_outputs=Spec(regex="a")), (0,))
    with pytest.raises(ValueError, match="uncompiled"):
        StepMasks.admit([ScheduledSeq("x", 0, 1, [1], 0, [0], True, uncompiled)], [SeqView(uncompiled, [])])
