"""How prompts are written for a chat model: through the checkpoint's chat template or not, few-shot examples as
turns of the conversation or as one user message, and a system instruction. lm-eval builds the prompts
(``simple_evaluate``'s own arguments); the template comes from the checkpoint's tokenizer files
(:meth:`retrofit.eval.adapter.RetrofitLM.apply_chat_template`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from retrofit.errors import RetrofitError


class ChatSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    apply_chat_template: bool = False
    # None: as lm-eval's own command line, turns when a template is applied.
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None

    def resolved(self) -> "ChatSettings":
        """The settings lm-eval runs with: ``fewshot_as_multiturn`` decided; turns without a template refused."""
        turns = self.apply_chat_template if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn
        if turns and not self.apply_chat_template:
            raise RetrofitError("--fewshot-as-multiturn needs --apply-chat-template: few-shot turns are turns "
                                "of the chat template")
        return self.model_copy(update={"fewshot_as_multiturn": turns})

    def evaluate_arguments(self) -> dict:
        """``lm_eval.simple_evaluate``'s keyword arguments for these settings."""
        chat = self.resolved()
        return {"apply_chat_template": chat.apply_chat_template, "fewshot_as_multiturn": chat.fewshot_as_multiturn,
                "system_instruction": chat.system_instruction}
