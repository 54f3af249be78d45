"""The seed's flags on a real chat model (SmolLM2-135M-Instruct from the demo extra): its own
template is kept byte for byte and its replies stop cleanly. Skipped without the demo extra."""

import json

import pytest

import data_preparation as dp
import test_model as tm
import train_lora
import utils
from reasonforge import sft, training

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_smollm2_keeps_its_template_and_stops_cleanly(tmp_path, demo_model):
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(str(demo_model))
    data = tmp_path / "data"
    assert dp.main(["--dataset", "sample", "--max-samples", "40", "--skip-upload", "--output-dir", str(data)]) == 0
    out = tmp_path / "run"
    assert train_lora.main(["--model-name", str(demo_model), "--dataset-path", str(data), "--output-dir", str(out),
                            "--max-steps", "2", "--save-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps",
                            "1", "--learning-rate", "1e-4"]) == 0
    assert (out / "final_model" / "chat_template.jinja").read_text() == base_tok.chat_template
    assert "<think>" not in base_tok.chat_template
    # What training fed the model is what the model's own template renders, system prompt included.
    dd, manifest = utils.load_prepared_dataset(data)
    config = training.TrainConfig.from_args(train_lora.build_parser().parse_args(["--model-name", str(demo_model)]))
    _, source = sft.choose_template(config, manifest, base_tok)
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    rows, _, _ = sft.tokenize_splits(dd, tok, source, config)
    expected = base_tok.apply_chat_template(utils.clean_messages(dd["train"][0]["messages"], source), tokenize=False)
    assert tok.decode(rows[0]["input_ids"]) == expected and "named SmolLM" in expected
    instructions = tmp_path / "i.json"
    instructions.write_text(json.dumps(["Hello!", "What is 2 + 2?", "Name a colour."]))
    for model_path in (out / "final_model", demo_model):
        report = tmp_path / "answers.json"
        assert tm.main(["--model-path", str(model_path), "--batch", "--instructions-file", str(instructions),
                        "--temperature", "0", "--max-new-tokens", "96", "--output-file", str(report)]) == 0
        results = json.loads(report.read_text())["results"]
        for r in results:
            assert "<|im_" not in r["response"] and "<|endoftext|>" not in r["response"]
            assert "\nuser\n" not in r["response"] and "\nassistant\n" not in r["response"]
        assert sum(r["stopped"] for r in results) >= 2, results
