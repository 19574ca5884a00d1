"""`ftcli chat`: a conversation with a trained model in the terminal, or one answer for a script.

The conversation is kept as messages and rendered with the tokenizer's chat template at every turn, so the
model reads exactly the layout it was trained on. Answers stream as they are decoded. Ctrl-C stops the answer
being written (what was written stays in the conversation) and returns to the prompt; Ctrl-C or Ctrl-D at an
empty prompt, or /exit, ends the session.
"""

import sys
from typing import Callable, Optional, TextIO

from ftcli.data.templates import end_of_turn_ids, generation_prompt_ids
from ftcli.decoding import Decoder, Sampling, TextStream
from ftcli.errors import InputError, redact
from ftcli.inference import OpenedModel

PROMPT = ">>> "
HELP = "Type a message. /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer."


class Conversation:
    """The messages so far and the decoder that answers them."""

    def __init__(self, opened: OpenedModel, decoder: Decoder, sampling: Sampling, system: Optional[str] = None):
        self.tokenizer = opened.tokenizer
        self.decoder = decoder
        self.sampling = sampling
        self.stop_ids = end_of_turn_ids(opened.tokenizer, getattr(opened.model, "generation_config", None))
        self.start = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.start)

    def reset(self) -> None:
        self.messages = list(self.start)

    def answer(self, question: str, show: Callable[[str], None]) -> str:
        """Answer `question`, showing each piece of text as it comes, and keep both turns in the conversation.
        A KeyboardInterrupt stops the answer; the part already shown is kept, then the interrupt goes on."""
        from jinja2 import TemplateError

        asked = self.messages + [{"role": "user", "content": question}]
        try:
            prompt_ids = generation_prompt_ids(self.tokenizer, asked)
        except TemplateError as err:
            raise InputError(f"The model's chat template refuses this conversation: {err}. Some templates take no "
                             "system message (drop --system) or need turns to alternate.") from None
        if self.decoder.room_for(len(prompt_ids)) == 0:
            raise InputError(f"The conversation is {len(prompt_ids)} tokens long, which fills the model's context "
                             f"of {self.decoder.context_length} tokens. Start over with /reset, or ask in fewer words.")
        self.messages = asked
        stream = TextStream(self.tokenizer)
        try:
            for token in self.decoder.generate(prompt_ids, self.sampling, self.stop_ids):
                show(stream.push(token))
            show(stream.rest())
        finally:
            self.messages.append({"role": "assistant", "content": stream.text()})
        return stream.text()


def answer_once(conversation: Conversation, question: str, out: Optional[TextIO] = None) -> None:
    """`--prompt`: only the answer on stdout, streamed, ending with a newline."""
    out = out or sys.stdout
    conversation.answer(question, lambda piece: _write(out, piece))
    _write(out, "\n")


def interactive(conversation: Conversation, description: str, out: Optional[TextIO] = None,
                notes: Optional[TextIO] = None) -> None:
    """The read-answer loop of a terminal session; returns when the person ends it."""
    out, notes = out or sys.stdout, notes or sys.stderr
    _enable_line_editing()
    compiling = "\nThe first answer compiles the decoder for this GPU (up to a minute)." if conversation.decoder.compiled else ""
    notes.write(redact(f"{description}\n{HELP}{compiling}\n"))
    notes.flush()
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
            _write(out, "\n")
            return
        question = line.strip()
        if question == "/exit":
            return
        if question == "/reset":
            conversation.reset()
            _write(out, "(conversation cleared)\n")
            continue
        if not question:
            continue
        try:
            conversation.answer(question, lambda piece: _write(out, piece))
            _write(out, "\n")
        except KeyboardInterrupt:
            _write(out, " [stopped]\n")
        except InputError as error:
            _write(notes, f"{error.message}\n")


def run(path, prompt: Optional[str], system: Optional[str], sampling: Sampling, base=None,
        compile: bool = True, seed: Optional[int] = None, trust_remote_code: bool = False) -> None:
    """Open the model and either answer `prompt` once or start the terminal session."""
    from ftcli.inference import open_model

    opened = open_model(path, base, trust_remote_code)
    decoder = Decoder(opened.model, opened.context_length, compile=compile, seed=seed)
    conversation = Conversation(opened, decoder, sampling, system)
    if prompt is not None:
        answer_once(conversation, prompt)
    else:
        interactive(conversation, opened.description)


def _enable_line_editing() -> None:
    """input() gets arrow keys and a history of what was typed once readline is loaded (not on every platform)."""
    try:
        import readline
    except ImportError:
        return
    readline.set_history_length(1000)


def _write(stream: TextIO, text: str) -> None:
    if text:
        stream.write(text)
        stream.flush()
