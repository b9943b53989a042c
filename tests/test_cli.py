"""``flashvlm generate``: the answer and figures on success; exit 2 and one line on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flashvlm.cli import main
from flashvlm.errors import FlashVLMError


def test_generate_prints_answer_tokens_and_prefill_time(tiny_llava_folder, sample_image_file, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_llava_folder),
            "--image",
            str(sample_image_file),
            "--prompt",
            "what is the color of the circle?",
            "--budget",
            "8",
            "--max-new-tokens",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("answer:")
    assert "kept 8 of 64 visual tokens (12.5%)" in out
    assert "prefill:" in out and "ms" in out


def test_generate_with_two_images_and_a_ratio_budget(tiny_llava_folder, sample_image_file, capsys):
    image = str(sample_image_file)
    code = main(
        [
            "generate",
            "--model",
            str(tiny_llava_folder),
            "--image",
            image,
            "--image",
            image,
            "--prompt",
            "how many?",
            "--budget",
            "25%",
            "--max-new-tokens",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("kept 16 of 64 visual tokens") == 2


def test_an_image_placeholder_in_the_prompt_keeps_the_chat_template(capsys):
    from scene_llava import FOLDER as SCENE_LLAVA

    from flashvlm.demo import EXAMPLES_DIR

    image = EXAMPLES_DIR / "attribute.png"
    answers = []
    prompts = ("what color is the square ?", "<image> what color is the square ?")
    for prompt in (*prompts, "USER: <image>\nwhat color is the square ? ASSISTANT:"):
        for method in ("flashvlm", "flashvlm:question"):
            argv = ["generate", "--model", str(SCENE_LLAVA), "--device", "cpu", "--image", str(image)]
            assert main([*argv, "--prompt", prompt, "--method", method, "--max-new-tokens", "3"]) == 0
            answers.append(capsys.readouterr().out.splitlines()[0])
    assert answers == ["answer: red"] * 6


def test_the_chat_template_puts_each_image_where_its_placeholder_is():
    from families.llava import tiny_llava_processor
    from families.shared import CHATML_TEMPLATE

    from flashvlm.loading import chat_prompt

    llava = tiny_llava_processor()  # LLaVA-1.5's template writes every image first, as "<image>\n"
    assert chat_prompt(llava, "<image> what is it ?") == chat_prompt(llava, "what is it ?")
    assert chat_prompt(llava, "what is it ?") == "USER: <image>\nwhat is it ? ASSISTANT:"
    assert chat_prompt(llava, "left <image>\n or right <image> ?", 2) == (
        "USER: left <image>\nor right <image>\n? ASSISTANT:"
    )
    chatml = tiny_llava_processor()
    chatml.chat_template = CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<|vision_start|><image><|vision_end|>")
    assert chat_prompt(chatml, "what is <image> it ?") == (
        "<|im_start|>user\nwhat is <|vision_start|><image><|vision_end|>it ?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_prompt_already_in_the_chat_format_is_used_as_given():
    from families.llava import tiny_llava_processor
    from families.shared import CHATML_TEMPLATE

    from flashvlm.loading import chat_prompt, chat_question

    llava = tiny_llava_processor()
    formatted = "USER: <image>\nwhat is it ? ASSISTANT:"
    assert chat_prompt(llava, formatted) == formatted  # the template was applied twice: "USER: USER: ..."
    assert chat_prompt(llava, "USER: <image> or <image> ? ASSISTANT: ", 2) == "USER: <image> or <image> ? ASSISTANT: "
    assert chat_question(llava, formatted) == " <image>\nwhat is it ? "
    assert chat_question(llava, "what is it ?") == "what is it ?"
    with pytest.raises(FlashVLMError, match=r"already in the chat format .* has 0 <image> for 1 image"):
        chat_prompt(llava, "USER: what is it ? ASSISTANT:")
    with pytest.raises(FlashVLMError, match=r"starts a chat turn \('USER:'\) but does not end with .*'ASSISTANT:'"):
        chat_prompt(llava, "USER: <image>\nwhat is it ?")
    chatml = tiny_llava_processor()
    chatml.chat_template = CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<|vision_start|><image><|vision_end|>")
    formatted = "<|im_start|>user\n<|vision_start|><image><|vision_end|>what ?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(chatml, formatted) == formatted
    assert chat_question(chatml, formatted) == "\n<|vision_start|><image><|vision_end|>what ?<|im_end|>\n"


def test_a_prompt_never_carries_a_second_bos_token():
    from PIL import Image
    from scene_llava import FOLDER as SCENE_LLAVA

    from flashvlm.loading import chat_prompt, load_model

    _, processor = load_model(str(SCENE_LLAVA), "cpu")  # its tokenizer adds <s> itself
    image = Image.new("RGB", (32, 32))

    def leading_ids(prompt: str) -> list[int]:
        return processor(images=[image], text=chat_prompt(processor, prompt))["input_ids"][0][:2]

    expected = leading_ids("what is it ?")
    assert expected[0] == processor.tokenizer.bos_token_id and expected[1] != expected[0]
    assert leading_ids("<s>USER: <image>\nwhat is it ? ASSISTANT:") == expected  # a user who typed the BOS token
    processor.chat_template = "{{ bos_token }}" + processor.chat_template  # as Gemma 3's template writes it
    assert leading_ids("what is it ?") == expected


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--budget": "0"}, "budget must be >= 1"),
        ({"--budget": "1.5"}, "ratio"),
        ({"--budget": "many"}, "'many'"),
        ({"--image": "/nonexistent/scene.png"}, "image file not found: /nonexistent/scene.png"),
        ({"--method": "magic"}, "unknown method 'magic'"),
        ({"--model": "/nonexistent/model"}, "no model folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_llava_folder, sample_image_file, capsys, change, message):
    arguments = {"--model": str(tiny_llava_folder), "--image": str(sample_image_file), "--prompt": "what?"}
    arguments.update(change)
    argv = ["generate"] + [item for pair in arguments.items() for item in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_image_and_unsupported_model(tmp_path, tiny_llava_folder, capsys):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    assert main(["generate", "--model", str(tiny_llava_folder), "--image", str(corrupt), "--prompt", "?"]) == 2
    assert "cannot read image" in capsys.readouterr().err

    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=32,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(tmp_path / "llama")
    image = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert main(["generate", "--model", str(tmp_path / "llama"), "--image", str(image), "--prompt", "?"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM" in err and "flashvlm supports: LlavaForConditionalGeneration" in err


def test_command_line_entry_point_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashvlm",
            "generate",
            "--model",
            str(tmp_path),
            "--image",
            "x.png",
            "--prompt",
            "?",
            "--budget",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "budget must be >= 1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("interrupt", ["os.kill(os.getpid(), signal.SIGINT)", "raise KeyboardInterrupt"])
def test_ctrl_c_while_the_command_starts_is_one_line(interrupt):
    # As the console script runs it: flashvlm.cli is imported before main() is called.
    # Ctrl-C lands in the first seconds, while torch is being imported.
    script = "\n".join(
        [
            "import os, signal, sys",
            # A process started in the background inherits SIGINT ignored; Ctrl-C in a terminal is not.
            "signal.signal(signal.SIGINT, signal.default_int_handler)",
            "class InterruptTorch:",
            "    def find_spec(self, name, path=None, target=None):",
            "        if name == 'torch':",
            f"            {interrupt}",
            "sys.meta_path.insert(0, InterruptTorch())",
            "from flashvlm.cli import main",
            "sys.exit(main(['generate', '--help']))",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (130, "flashvlm: interrupted\n")
