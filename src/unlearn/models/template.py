"""The prompt format of a QA row (``model.template``), shared by every stage that encodes one.

A real checkpoint must be scored in the format it was fine-tuned on: a chat model
trained on ``[INST] q [/INST] a`` and scored on ``Question: q\\nAnswer: a`` gives
numbers that mean nothing, silently. So the format is configuration, one
:class:`QAFormat` built from ``params.yaml`` (:func:`qa_format`), and fine-tuning,
the reference cache, unlearning, scoring and generation all encode through it
(:mod:`unlearn.models.formatting`). It is part of every cache key (the cache is
keyed on the encoded token ids themselves) and of the registered model's tags.

A format is either

* a **text template** with ``{question}`` and ``{answer}`` slots (``preset: plain``,
  ``llama2_chat``, ... or ``model.template.format``), or
* the **tokenizer's own chat template** (``preset: chat`` / ``llama3_instruct``):
  ``tokenizer.apply_chat_template`` with an optional system prompt, as
  open-unlearning does for instruct models.

The presets mirror open-unlearning's model configs (``configs/model/*.yaml``,
``template_args``). Two encodings exist (:mod:`unlearn.models.formatting`):

* **this project's** (default): prompt and answer tokenised separately, the
  template's trailing spaces moved into the answer (``"Answer: {answer}"`` scores
  ``" Paris"``, not ``"Paris"`` after a lone space token), every answer token scored;
* **open-unlearning's** (``eval.parity: open-unlearning``, :attr:`QAFormat.joint`):
  prompt + answer tokenised jointly, the prompt's own token count masked, so a
  boundary merge leaves the first answer token unscored; each preset then uses
  open-unlearning's exact tags (:attr:`Preset.parity_text`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from ..config import check_template_text as check_text
from ..errors import UserError

Q_SLOT, A_SLOT = "{question}", "{answer}"


@dataclass(frozen=True)
class Preset:
    """A named format: a text template (``text``) or the tokenizer's chat template (``text=None``).

    ``parity_text``: open-unlearning's tags for the same model, used under
    ``eval.parity: open-unlearning`` (None: same as ``text``). ``system_prompt`` and
    ``date_string`` are passed to the chat template (open-unlearning's Llama-3 config).
    """

    text: str | None
    parity_text: str | None = None
    system_prompt: str | None = None
    date_string: str | None = None
    source: str = ""


PRESETS: dict[str, Preset] = {
    # This project's format since the start; open-unlearning's phi-1_5 tags are the same string.
    "plain": Preset("Question: {question}\nAnswer: {answer}",
                    source="TOFU's and open-unlearning's phi-1_5 tags: 'Question: ', '\\n', 'Answer: '"),
    "phi_1_5": Preset("Question: {question}\nAnswer: {answer}",
                      source="open-unlearning configs/model/phi-1_5.yaml"),
    # Meta's Llama-2-chat turn is '[INST] q [/INST] a'; open-unlearning drops the space before the answer
    # ("asst_start_tag: ''") because its joint tokenisation merges it badly: its parity text does the same.
    "llama2_chat": Preset("[INST] {question} [/INST] {answer}", parity_text="[INST] {question} [/INST]{answer}",
                          source="open-unlearning configs/model/Llama-2-7b-chat-hf.yaml"),
    "llama3_instruct": Preset(None, system_prompt="You are a helpful assistant.", date_string="10 Apr 2025",
                              source="open-unlearning configs/model/Llama-3.2-1B-Instruct.yaml"),
    "chat": Preset(None, source="the tokenizer's own chat template"),
}


class TemplateError(UserError):
    """A ``model.template`` that cannot format a row (no chat template on the tokenizer): the user's to fix."""


@dataclass(frozen=True)
class QAFormat:
    """How one (question, answer) row becomes text: see the module docstring.

    ``text``: the template with its slots (None: the tokenizer's chat template,
    or ``chat_template`` when given). ``joint``: open-unlearning's joint
    tokenisation (``eval.parity``). Everything here goes into cache keys and tags
    (:meth:`key`).
    """

    preset: str = "plain"
    text: str | None = PRESETS["plain"].text
    system_prompt: str | None = None
    date_string: str | None = None
    chat_template: str | None = None
    joint: bool = False

    def __post_init__(self) -> None:
        if self.text is not None:
            check_text(self.text)

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def key(self) -> dict[str, Any]:
        """Everything that changes the token ids: for cache keys, reference keys and model tags."""
        return asdict(self)

    def describe(self) -> str:
        """One line for logs and tags: the preset and the text (or 'chat template')."""
        what = "the tokenizer's chat template" if self.is_chat else repr(self.text)
        return f"{self.preset}: {what}" + (" (open-unlearning joint tokenisation)" if self.joint else "")

    # ---------------------------------------------------------------- text
    def _messages(self, question: str, answer: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def _chat_kwargs(self, tokenizer) -> dict[str, Any]:
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"model.template.preset={self.preset!r} uses the tokenizer's chat template, and "
                f"{getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'} has none: set "
                "model.template.chat_template (a Jinja template) or pick a text preset (plain, phi_1_5, llama2_chat)")
        kw: dict[str, Any] = {"chat_template": self.chat_template}
        if self.date_string is not None:
            kw["date_string"] = self.date_string
        return kw

    def chat_prompt(self, tokenizer, question: str) -> str:
        """The chat template rendered up to the assistant's turn (``add_generation_prompt=True``)."""
        return tokenizer.apply_chat_template(self._messages(question), tokenize=False, add_generation_prompt=True,
                                             **self._chat_kwargs(tokenizer))

    def chat_ids(self, tokenizer, question: str, answer: str | None = None) -> list[int]:
        """Token ids of the rendered chat (open-unlearning's ``apply_chat_template(tokenize=True)``).

        With ``answer``: the whole conversation; without: the prompt up to the assistant's turn.
        """
        out = tokenizer.apply_chat_template(self._messages(question, answer), tokenize=True,
                                            add_generation_prompt=answer is None, return_dict=False,
                                            **self._chat_kwargs(tokenizer))
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    def split_text(self, question: str, answer: str = "") -> tuple[str, str]:
        """(prompt, answer) strings of a text template.

        This project's encoding: question and answer stripped, the template's
        trailing spaces before ``{answer}`` moved to the answer (so ``"Answer: {answer}"``
        gives ``"...Answer:"`` + ``" Paris"``), text after ``{answer}`` (a turn end
        for few-shot use) dropped: the answer ends with EOS. Joint (parity)
        encoding: open-unlearning's ``wrapped_prompt`` and response, untouched.
        """
        assert self.text is not None
        before = self.text.split(A_SLOT)[0]
        if self.joint:
            return before.replace(Q_SLOT, question), answer
        before = before.replace(Q_SLOT, question.strip())
        prompt = before.rstrip(" ")
        return prompt, " " * (len(before) - len(prompt)) + answer.strip()

    def corpus_text(self, question: str, answer: str) -> str:
        """A row as one string for training the project's own tokenizer (chat formats: the plain text)."""
        fmt = self if not self.is_chat else replace(self, text=PRESETS["plain"].text)
        prompt, ans = fmt.split_text(question, answer)
        return prompt + ans


def qa_format(template: Any = None, *, parity: str = "none") -> QAFormat:
    """The :class:`QAFormat` of ``model.template`` (a :class:`unlearn.config.TemplateCfg`, or None: plain).

    ``parity``: ``eval.parity``; ``"open-unlearning"`` selects the joint
    tokenisation and the preset's open-unlearning tags (evaluation only: training
    always uses this project's encoding).
    """
    name = getattr(template, "preset", None) or "plain"
    if name not in PRESETS:
        raise TemplateError(f"model.template.preset must be one of {', '.join(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    joint = parity == "open-unlearning"
    custom = getattr(template, "format", None)
    text = custom if custom is not None else (preset.parity_text or preset.text) if joint else preset.text
    system = getattr(template, "system_prompt", None)
    return QAFormat(
        preset=name if custom is None else f"{name}+format",
        text=check_text(text) if text is not None else None,
        system_prompt=system if system is not None else preset.system_prompt,
        date_string=preset.date_string,
        chat_template=getattr(template, "chat_template", None),
        joint=joint,
    )


PLAIN = QAFormat()


def train_format(p: Any) -> QAFormat:
    """The format fine-tuning, the reference cache and unlearning encode with (``model.template``)."""
    return qa_format(p.model.template)


def eval_format(p: Any) -> QAFormat:
    """The format the evaluation scores and generates with: ``model.template`` under ``eval.parity``."""
    return qa_format(p.model.template, parity=p.eval.parity)
