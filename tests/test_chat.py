"""StableLM prompt format, stop tokens and sampling."""
import torch

import pytest

from quantkit.chat import STABLELM_SYSTEM_PROMPT, Sampler, chat_template, render_prompt, stop_token_ids


def test_prompt_with_system_and_two_turn_history():
    text = render_prompt("And 3+3?", system="Be brief.\n", history=[("Hi", "Hello!"), ("2+2?", "4")])
    assert text == (
        "<|SYSTEM|>Be brief.\n<|USER|>Hi<|ASSISTANT|>Hello!<|USER|>2+2?<|ASSISTANT|>4<|USER|>And 3+3?<|ASSISTANT|>"
    )


def test_default_system_prompt_is_the_cards_five_lines():
    lines = STABLELM_SYSTEM_PROMPT.split("\n")
    assert len(lines) == 6 and lines[-1] == ""  # five lines, each ending in a line break
    assert lines[0] == "# StableLM Tuned (Alpha version)"
    assert lines[4] == "- StableLM will refuse to participate in anything that could harm a human."
    assert render_prompt("hi").startswith("<|SYSTEM|># StableLM Tuned (Alpha version)\n- StableLM is a helpful")


def test_real_tokenizer_stop_ids_and_single_id_chat_tokens(stablelm_tokenizer):
    assert stop_token_ids(stablelm_tokenizer) == [50278, 50279, 50277, 1, 0]
    for text, expected in [("<|SYSTEM|>", 50277), ("<|USER|>", 50278), ("<|ASSISTANT|>", 50279)]:
        assert stablelm_tokenizer(text)["input_ids"] == [expected]
    ids = stablelm_tokenizer(render_prompt("Hello"))["input_ids"]
    assert ids[0] == 50277 and ids[-1] == 50279 and ids.count(50278) == 1


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))

    def draw(seed):
        sampler = Sampler(temperature=1.0, seed=seed)
        return torch.stack([sampler(logits) for _ in range(8)]).tolist()

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_is_greedy_and_padding_rows_are_never_chosen():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    logits[:, 45] = 100.0  # a padding row that would win
    greedy = Sampler(vocab_limit=40)(logits)
    assert (greedy < 40).all()
    assert torch.equal(Sampler(temperature=0.7, top_k=1, seed=3, vocab_limit=40)(logits), greedy)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    sampler = Sampler(temperature=1.0, top_p=0.8, seed=0)
    drawn = {sampler(logits).item() for _ in range(200)}
    assert drawn == {0, 1}


CHAT_CASES = [
    ([{"role": "user", "content": "What is GPTQ?"}], ("What is GPTQ?", STABLELM_SYSTEM_PROMPT, ())),
    ([{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "Hi"}], ("Hi", "Be brief.\n", ())),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
     ("And 3+3?", STABLELM_SYSTEM_PROMPT, (("Hi", "Hello!"), ("2+2?", "4")))),
    ([{"role": "system", "content": "Só isso: \"aspas\" {{ chaves }}"}, {"role": "user", "content": "a"},
      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     ("c", "Só isso: \"aspas\" {{ chaves }}", (("a", "b"),))),
]


@pytest.mark.parametrize("messages, prompt", CHAT_CASES)
def test_chat_template_renders_exactly_the_prompt_format(stablelm_tokenizer, messages, prompt):
    user, system, history = prompt
    rendered = stablelm_tokenizer.apply_chat_template(messages, chat_template=chat_template(), tokenize=False,
                                                      add_generation_prompt=True)
    assert rendered == render_prompt(user, system=system, history=history)
    without = stablelm_tokenizer.apply_chat_template(messages, chat_template=chat_template(), tokenize=False)
    assert rendered == without + "<|ASSISTANT|>"


def test_chat_template_refuses_unknown_roles(stablelm_tokenizer):
    with pytest.raises(Exception, match="roles must be"):
        stablelm_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=chat_template(),
                                               tokenize=False)


def test_long_chat_drops_oldest_whole_turns_and_refuses_a_message_too_long_alone(monkeypatch, capsys):
    """`quantkit chat` on the tiny model (256 positions), driven by scripted input: every prompt fits beside the
    answer and is the system prompt, then the longest suffix of whole turns that fits, then the new message."""
    from quantkit import app
    from quantkit.cli import main
    from quantkit.runner import generate

    system, max_new = "Be brief.\n", 24
    users = [" ".join(["Explain the assert statement and the with statement, briefly."] * 4) + f" Question {i}."
             for i in range(4)]
    too_long = " ".join(["Explain the assert statement."] * 60)
    script = iter(users[:3] + [too_long] + users[3:])
    monkeypatch.setattr("builtins.input", lambda prompt: next(script, ""))
    calls = []  # (tokenizer, prompt ids, answer text) of each generate call

    def recording_generate(backend, prompts, *args, **kwargs):
        results = generate(backend, prompts, *args, **kwargs)
        answer = backend.tokenizer.decode(results[0].token_ids, skip_special_tokens=True)
        calls.append((backend.tokenizer, prompts[0], answer))
        return results

    monkeypatch.setattr(app, "generate", recording_generate)
    assert main(["chat", "--model", "tiny", "--greedy", "--max-new-tokens", str(max_new), "--system", system]) == 0
    err = capsys.readouterr().err.splitlines()

    assert len(calls) == len(users)  # the message too long alone never ran
    turns, first_kept, expected_notes = [], 0, []
    for user, (tokenizer, prompt, answer) in zip(users, calls):
        def ids(start: int) -> list[int]:
            return tokenizer(render_prompt(user, system, turns[start:]))["input_ids"]

        kept = next(start for start in range(len(turns) + 1) if ids(start) == prompt)
        assert kept >= first_kept and len(prompt) + max_new <= 256
        assert kept == 0 or len(ids(kept - 1)) + max_new > 256  # nothing dropped that would have fitted
        if kept > first_kept:
            expected_notes.append(f"(dropped the oldest {kept - first_kept} turn(s) to stay within the model's 256 "
                                  "positions)")
        first_kept = kept
        turns.append((user, answer))
    assert first_kept > 0  # the conversation did outgrow the context
    assert [line for line in err if line.startswith("(dropped")] == expected_notes
    refusals = [line for line in err if line.startswith("error")]
    assert len(refusals) == 1 and refusals[0].startswith("error: message too long: with the system prompt it takes ")
    assert refusals[0].endswith(f"with max_new_tokens {max_new} the model's 256 positions leave {256 - max_new}")
