"""The product contract's table of bad inputs: one row per mistake a user makes on the command line.

Each row is (id, argv, match, options): `argv` is formatted with the paths of the product suite's
world (`{bert}`, `{cls}`, ...; see tests/test_product.py), `match` is a regular expression the one
error line must contain, and `options` may say ``tty=True`` (stdin is a terminal: the command must
not wait on it) or ``needs="readonly"`` (a folder this process cannot write in must exist here).
Add a row for every mistake found; tests/test_product.py runs each through the same checks.
"""

from __future__ import annotations

import pytest

T = ["train", "--model", "{bert}", "--data", "{sent}", "--out", "{new}", "--max-steps", "2", "--no-progress"]
CHAT = ["train", "--model", "{llama}", "--data", "{chat}", "--out", "{new}", "--max-steps", "2", "--no-progress"]


def row(id_: str, argv: list[str], match: str, **options) -> pytest.param:
    return pytest.param(argv, match, options, id=id_)


BAD = [
    # -- train: the output folder
    row("train out is a file", [*T, "--out", "{file}"], r"--out .* is a file; give a folder"),
    row("train out under a file", [*T, "--out", "{file}/run"], r"lies under .*, which is a file"),
    row("train out read-only", [*T, "--out", "{readonly}/run"], r"cannot write in .*choose another --out",
        needs="readonly"),
    row("train out holds a finished run", [*T, "--out", "{cls_run}"], r"finished run.*another --out.*--overwrite"),
    row("train out holds an unfinished run", [*T, "--out", "{unfinished}"], r"unfinished run.*--resume.*--overwrite"),
    row("train out empty string", [*T, "--out", ""], r"out must not be empty"),
    # -- train: settings out of range, of the wrong kind, or unknown
    row("train metric unknown", [*T, "--metric", "foo"], r"metric must be one of accuracy, loss, macro_f1"),
    row("train metric of another task", [*T, "--metric", "perplexity"], r"perplexity is not measured for classif"),
    row("train warmup negative", [*T, "--warmup", "-1"], r"warmup must be >= 0"),
    row("train threads zero", [*T, "--threads", "0"], r"threads must be a positive integer"),
    row("train num-labels one", [*T, "--num-labels", "1"], r"num_labels must be an integer >= 2"),
    row("train num-labels below the classes", [*T, "--data", "{three}", "--num-labels", "2"],
        r"--num-labels 2 is fewer than the 3 classes"),
    row("train num-labels for lm", [*CHAT, "--task", "lm", "--num-labels", "3"], r"--num-labels is for classif"),
    row("train lr negative", [*T, "--lr", "-1"], r"lr must be > 0"),
    row("train lr not a number", [*T, "--lr", "fast"], r"--lr: invalid float value: 'fast'"),
    row("train head-lr zero", [*T, "--head-lr", "0"], r"head_lr must be > 0"),
    row("train epochs zero", [*T, "--epochs", "0"], r"epochs must be > 0"),
    row("train eval-fraction one and a half", [*T, "--eval-fraction", "1.5"], r"eval_fraction must be in \(0, 1\)"),
    row("train batch-size zero", [*T, "--batch-size", "0"], r"batch_size must be a positive integer"),
    row("train batch-size a word", [*T, "--batch-size", "many"], r"invalid int value: 'many'"),
    row("train grad-accum zero", [*T, "--grad-accum", "0"], r"grad_accum must be a positive integer"),
    row("train max-steps negative", [*T, "--max-steps", "-3"], r"max_steps must be a positive integer"),
    row("train max-eval-examples zero", [*T, "--max-eval-examples", "0"], r"max_eval_examples must be a positive"),
    row("train max-grad-norm negative", [*T, "--max-grad-norm", "-1"], r"max_grad_norm must be >= 0"),
    row("train weight-decay negative", [*T, "--weight-decay", "-0.1"], r"weight_decay must be >= 0"),
    row("train seed negative", [*T, "--seed", "-1"], r"seed must be an integer >= 0"),
    row("train base-dropout one", [*T, "--base-dropout", "1"], r"base_dropout must be in \[0, 1\)"),
    row("train calibration-batches zero", [*T, "--calibration-batches", "0"], r"calibration_batches must be a pos"),
    row("train early-stopping without eval-every", [*T, "--early-stopping", "2"], r"set eval_every too"),
    row("train schedule unknown", [*T, "--schedule", "cosin"], r"invalid choice: 'cosin'.*did you mean cosine"),
    row("train task misspelt", [*T, "--task", "clasification"], r"did you mean classification\?"),
    row("train quantize unknown", [*T, "--quantize", "nf5"], r"invalid choice: 'nf5'"),
    row("train format unknown", [*T, "--format", "peft"], r"invalid choice: 'peft'"),
    row("train hf-peft format of a method without one", [*T, "--method", "bitfit", "--format", "hf-peft"],
        r"'bitfit' has no Hugging Face PEFT layout"),
    row("train flag misspelt", [*T, "--lrr", "0.1"], r"unrecognized argument --lrr; did you mean --lr\?"),
    row("train flag abbreviated", [*T, "--max-st", "3"], r"unrecognized argument --max-st; did you mean --max-steps"),
    row("train stray word", [*T, "lora"], r"unexpected argument 'lora'"),
    row("train task lm on an encoder", [*T, "--task", "lm"], r"needs a causal language model"),
    # -- train: method and options
    row("train method unknown", [*T, "--method", "lorra"], r"unknown method 'lorra'.*Did you mean: lora"),
    row("train method option empty", [*T, "--method-options", "alpha="], r"'alpha' has an empty value"),
    row("train method option not key=value", [*T, "--method-options", "r8"], r"'r8' is not key=value"),
    row("train method option unknown", [*T, "--method-options", "rank=4"], r"unknown option.*'rank'"),
    row("train method option of the wrong type", [*T, "--method-options", "alpha=big"], r"alpha must be a number"),
    row("train method option out of range", [*T, "--method-options", "r=0"], r"r must be a positive integer"),
    row("train method option list for a number", [*T, "--method-options", "dropout=[1]"], r"dropout must be a numb"),
    row("train target misspelt", [*T, "--method-options", "targets=[qurey]"], r"qurey"),
    # -- train: model, data and config files
    row("train model unknown", [*T, "--model", "minilmm"], r"unknown embedded model 'minilmm'.*Did you mean: minilm"),
    row("train model is a file", [*T, "--model", "{file}"], r"is a file; --model takes a model folder"),
    row("train model folder without config", [*T, "--model", "{empty_dir}"], r"not a Hugging Face model folder"),
    row("train data missing", [*T, "--data", "{missing}.csv"], r"data file .* does not exist"),
    row("train data is a folder", [*T, "--data", "{empty_dir}"], r"is a folder; pass a CSV"),
    row("train data of unknown kind", [*T, "--data", "{file}"], r"cannot tell the format"),
    row("train data not UTF-8", [*T, "--data", "{latin1}"], r"not UTF-8"),
    row("train data with one class", [*T, "--data", "{one_class}"], r"one class only \('pos'\).*--label-field"),
    row("train data with 500 classes", [*T, "--data", "{many_classes}"], r"\(\d+ in all\)\).*free text.*--label-f"),
    row("train data all texts empty", [*T, "--data", "{all_empty}"], r"every training row .* empty 'text'"),
    row("train label column missing", [*T, "--label-field", "lable"], r"no column 'lable'.*Did you mean: label"),
    row("train eval data with an unseen class", [*T, "--data", "{cats}", "--eval-data", "{cats_eval}"],
        r"'meh' does not occur in the training data"),
    row("train dataset name misspelt", [*T, "--data", "rotten-tomatoe"], r"Did you mean: rotten-tomatoes"),
    row("train config missing", [*T, "--config", "{missing}.yaml"], r"config file .* does not exist"),
    row("train config not YAML", [*T, "--config", "{bad_yaml}"], r"not valid YAML \(line \d+, column \d+\)"),
    row("train config key of another trainer", [*T, "--config", "{alias_yaml}"], r"'learning_rate'.*Did you mean: lr"),
    row("train config value YAML cannot construct", [*T, "--config", "{date_yaml}"], r"holds a value YAML cannot read"),
    row("train max length past the position table", [*T, "--max-length", "100000"], r"longer than .* can read"),
    row("train config value of the wrong type", [*T, "--config", "{null_yaml}"], r"eval_fraction needs a value \(a number\)"),
    # -- train: resume
    row("train resume from nowhere", [*T, "--resume", "{missing}"], r"holds no checkpoint; --resume takes a run"),
    row("train bare resume without a checkpoint", [*T, "--resume"], r"no checkpoint in .*checkpoint"),
    row("train resume another run's checkpoint", ["train", "--resume", "{cls_run}", "--seed", "9", "--no-progress"],
        r"different run \(seed: 1, now 9\)"),
    # -- eval
    row("eval without adapter", ["eval"], r"required: --adapter"),
    row("eval adapter missing", ["eval", "--adapter", "{missing}"], r"adapter folder .* does not exist"),
    row("eval adapter is a file", ["eval", "--adapter", "{cls}/adapter.json"], r"is a file; --adapter takes an adap"),
    row("eval adapter is a run folder", ["eval", "--adapter", "{cls_run}"], r"training run's folder.*/adapter"),
    row("eval adapter truncated", ["eval", "--adapter", "{truncated}", "--model", "{enc}", "--data", "{sent}"],
        r"adapter.safetensors .*truncated"),
    row("eval adapter.json garbage", ["eval", "--adapter", "{garbage}", "--model", "{enc}", "--data", "{sent}"],
        r"adapter.json is not readable JSON"),
    row("eval hf adapter without run.json", ["eval", "--adapter", "{hf_alone}"], r"which base model\? pass --model"),
    row("eval on another base", ["eval", "--adapter", "{cls}", "--model", "{llama}"], r"--no-check-base"),
    row("eval max-eval-examples zero", ["eval", "--adapter", "{cls}", "--max-eval-examples", "0"],
        r"--max-eval-examples: must be an integer >= 1"),
    row("eval batch-size zero", ["eval", "--adapter", "{cls}", "--batch-size", "0"], r"--batch-size: must be an int"),
    row("eval max-length negative", ["eval", "--adapter", "{cls}", "--max-length", "-1"], r"--max-length: must be"),
    row("eval data missing", ["eval", "--adapter", "{cls}", "--data", "{missing}.csv"], r"does not exist"),
    row("eval label column missing", ["eval", "--adapter", "{cls}", "--label-field", "nope"], r"no column 'nope'"),
    row("eval data without held-out rows", ["eval", "--adapter", "{cls}", "--data", "{tiny}"],
        r"no held-out examples to evaluate on; pass --eval-data"),
    row("eval flag misspelt", ["eval", "--adapter", "{cls}", "--max-eval", "3"],
        r"unrecognized argument --max-eval; did you mean --max-eval-examples"),
    # -- generate
    row("generate max-new-tokens negative", ["generate", "--model", "{llama}", "--prompt", "hi", "--max-new-tokens",
                                             "-5"], r"--max-new-tokens: must be an integer >= 1, got '-5'"),
    row("generate max-new-tokens zero", ["generate", "--model", "{llama}", "--prompt", "hi", "--max-new-tokens", "0"],
        r"--max-new-tokens: must be an integer >= 1"),
    row("generate temperature negative", ["generate", "--model", "{llama}", "--prompt", "hi", "--temperature", "-1"],
        r"--temperature: must be a number >= 0"),
    row("generate temperature not a number", ["generate", "--model", "{llama}", "--prompt", "hi", "--temperature",
                                              "nan"], r"--temperature: must be a number >= 0"),
    row("generate with a classification adapter", ["generate", "--adapter", "{cls}", "--prompt", "hi"],
        r"needs a causal-LM adapter.*classification adapter of .*BertForSequenceClassification"),
    row("generate with a classification hf adapter", ["generate", "--adapter", "{cls_hf}", "--prompt", "hi"],
        r"classification adapter of"),
    row("generate waits on a terminal", ["generate", "--model", "{llama}"], r"no prompt: pass --prompt", tty=True),
    row("generate without a model", ["generate", "--prompt", "hi"], r"pass --model \(a causal LM"),
    row("generate on an encoder", ["generate", "--model", "{bert}", "--prompt", "hi"], r"generate needs a causal language model; .* is an encoder"),
    row("generate adapter missing", ["generate", "--adapter", "{missing}", "--prompt", "hi"], r"does not exist"),
    row("generate adapter is a run folder", ["generate", "--adapter", "{chat_run}", "--prompt", "hi"],
        r"training run's folder"),
    # -- merge
    row("merge without out", ["merge", "--adapter", "{cls}"], r"required: --out"),
    row("merge out is a file", ["merge", "--adapter", "{cls}", "--out", "{file}"], r"--out .* is a file"),
    row("merge out not empty", ["merge", "--adapter", "{cls}", "--out", "{cls_run}"], r"exists and is not empty"),
    row("merge out read-only", ["merge", "--adapter", "{cls}", "--out", "{readonly}/merged"], r"cannot write in",
        needs="readonly"),
    row("merge adapter missing", ["merge", "--adapter", "{missing}", "--out", "{new}"], r"does not exist"),
    row("merge adapter is a run folder", ["merge", "--adapter", "{cls_run}", "--out", "{new}"], r"run's folder"),
    row("merge adapter truncated", ["merge", "--adapter", "{truncated}", "--model", "{enc}", "--out", "{new}"],
        r"truncated"),
    # -- info
    row("info of a file", ["info", "{cls}/adapter.safetensors"], r"is a file; peftkit info takes an adapter folder"),
    row("info of a run folder", ["info", "{cls_run}"], r"training run's folder.*adapter"),
    row("info of a truncated peftkit adapter", ["info", "{truncated}"], r"adapter.safetensors"),
    row("info of a truncated hf adapter", ["info", "{truncated_hf}"], r"adapter_model.safetensors is not a valid"),
    row("info of a garbage adapter.json", ["info", "{garbage}"], r"adapter.json is not readable JSON"),
    row("info of a folder that does not exist", ["info", "{missing}"], r"does not exist"),
    row("info of an empty folder", ["info", "{empty_dir}"], r"holds no adapter"),
    row("info without a path", ["info"], r"required: path"),
    row("info of two paths", ["info", "{cls}", "{cls}"], r"unexpected argument"),
    # -- methods and the top level
    row("methods with a flag it does not have", ["methods", "--lr", "1"], r"unrecognized argument --lr"),
    row("command misspelt", ["trian"], r"invalid choice: 'trian'.*did you mean train\?"),
    row("top-level flag misspelt", ["--versio"], r"unrecognized argument --versio; did you mean --version\?"),
]
