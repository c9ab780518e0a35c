"""Run by tests/test_export.py in a subprocess where picochat cannot be imported: what a user
with only transformers sees of an exported folder. Reads a request (torch.save'd dict), writes
the answers (logits, greedy generations, chat-template ids, encodings) for the test to compare."""

import sys

import torch


class NoPicochat:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "picochat":
            raise ImportError("picochat is blocked in this check: the export must stand alone")


sys.meta_path.insert(0, NoPicochat())

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(folder, request_path, answer_path):
    request = torch.load(request_path)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    answer = {"class": type(model).__name__, "tokenizer_class": type(tokenizer).__name__}
    with torch.no_grad():
        answer["logits"] = model(request["batch"]).logits
        answer["generated"] = [model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False)[0].tolist()
                               for p in request["prompts"]]
        # the same prompts in one left-padded batch
        width = max(len(p) for p in request["prompts"])
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in request["prompts"]])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in request["prompts"]])
        answer["generated_batch"] = model.generate(ids, attention_mask=mask, max_new_tokens=20,
                                                   do_sample=False)[:, width:].tolist()
    answer["encoded"] = [tokenizer(text)["input_ids"] for text in request["texts"]]
    answer["decoded"] = [tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
                         for text in request["texts"]]
    answer["chat"] = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]
                      for m in request["conversations"]]
    answer["chat_prompt"] = [tokenizer.apply_chat_template(m[:-1], tokenize=True, add_generation_prompt=True,
                                                           return_dict=True)["input_ids"]
                             for m in request["conversations"]]
    try:
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)
        answer["bad_order"] = "accepted"
    except Exception as e:
        answer["bad_order"] = str(e)
    torch.save(answer, answer_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
