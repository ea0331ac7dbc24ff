"""``dschat-core chat``: talk to a trained actor, tokens streamed as they come.

With a tokenizer that has a chat template, the conversation is kept as messages and every prompt is rendered
through the template (as training rendered conversational data); without one, it is kept as DeepSpeed-Chat's
chatbot keeps it (``\\n\\nHuman: …\\n\\nAssistant: …``), and an answer that runs on into a next ``Human:`` turn is
cut there. ``clear`` starts over, ``quit`` (or end of input) leaves.
"""

from __future__ import annotations

from collections.abc import Callable

from .data.conversations import Renderer
from .models import check_model_folder, load_causal_lm, load_tokenizer


def chat(
    model_dir: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    trust_remote_code: bool = False,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> None:
    import torch
    from transformers import TextStreamer

    check_model_folder(model_dir, "a trained actor (runs/RUN/actor or runs/RUN/ppo/actor)")
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code).eval()
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    decoding = f"sampling at temperature {temperature}" if temperature > 0 else "greedy"
    renderer = Renderer(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    form = "the tokenizer's chat template" if renderer else "DeepSpeed-Chat's prompt format (Human and Assistant turns)"
    write(
        f"chatting with {model_dir}: {form}, the history kept, {decoding}, up to {max_new_tokens} new tokens.\n"
        "Type `clear` to start over, `quit` or Ctrl-D to leave.\n"
    )
    history = ""
    turns: list[dict[str, str]] = []
    while True:
        try:
            text = read("Human: ").strip()
        except EOFError:
            break
        if text in ("quit", "exit"):
            break
        if text == "clear":
            history, turns = "", []
            continue
        if not text:
            continue
        if renderer is not None:
            turns.append({"role": "user", "content": text})
            history = renderer.prompt(turns)
        else:
            history += f"\n\nHuman: {text}\n\nAssistant:"
        ids = tokenizer(history, return_tensors="pt")["input_ids"][:, -(limit - max_new_tokens) :]
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        write("Assistant:")
        with torch.no_grad():
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                **sampling,
            )
        answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        if renderer is not None:
            turns.append({"role": "assistant", "content": answer.strip()})
        else:
            history += answer.split("Human:")[0].rstrip()
