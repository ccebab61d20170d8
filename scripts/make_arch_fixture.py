# Tiny random Qwen2, Qwen3 and Llama-3.2-style checkpoints as the Hub lays them out (config.json
# with the family's keys, model.safetensors, tokenizer.json, tokenizer_config.json with the
# family's chat template) and what HF transformers computes with them: logits, tokenizer ids
# and chat-template renderings (tools, tool calls, tool responses, Qwen3's thinking branches,
# Llama 3.2's date and tools-in-user-message). The Rust tests load the folders through our
# safetensors path and, written as GGUF by llama.cpp's converter rules, through our GGUF path.
#   python3 -m venv ~/.cache/wildlong/hf-venv && ~/.cache/wildlong/hf-venv/bin/pip install --no-deps torch \
#     && ~/.cache/wildlong/hf-venv/bin/pip install transformers safetensors tokenizers jinja2 numpy
#   ~/.cache/wildlong/hf-venv/bin/python scripts/make_arch_fixture.py
# (made with transformers 5.24.0, torch 2.15.0, tokenizers 0.23.3: tests/fixtures/arch/versions.json)
# The chat templates are the published ones: Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen3-8B and
# meta-llama/Llama-3.2-1B-Instruct (tokenizer_config.json `chat_template`).
import json, os, unicodedata
import tokenizers, torch, transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

OUT = "tests/fixtures/arch"

QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we'll see what they've done.",
    "def main():\n    print(\"hello, world\")  # 42\n\treturn [1, 2, 3]\n",
    "Long documents need long contexts: 128K tokens, RoPE scaling, YaRN and llama3 rules.",
    "Café, naïve, résumé, Zürich, São Paulo, Ελληνικά, русский текст, 中文字符测试, 日本語のテキスト.",
    "Numbers 1234567890 and 3.14159, dates 2026-12-03, prices $19.99 and 100%!",
    "   leading spaces, trailing spaces   \n\n\nand blank lines\r\nwith CRLF.",
    "Emoji 🤖🚀 and symbols ©®™ — dashes – and “quotes”.",
] * 3

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                "<think>", "</think>"]
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


def bpe_tokenizer(regex, nfc, ignore_merges, special, vocab_size=500):
    tk = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=not nfc, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_special_tokens(special)  # after the vocabulary, as in Qwen's and Llama 3's files
    return tk


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city, now",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "lookup", "description": "Look a term up",
                                      "parameters": {"type": "object", "properties": {
                                          "term": {"type": "string"}, "limit": {"type": "integer"}}}}},
]
CALL = {"type": "function", "function": {"name": "get_weather",
                                         "arguments": {"city": "Zürich", "unit": "celsius", "days": [1, 2.5]}}}
CHATS = {
    "single": [{"role": "user", "content": "What is RoPE scaling?"}],
    "system": [{"role": "system", "content": "  You are terse.  "},
               {"role": "user", "content": "Name three primes."},
               {"role": "assistant", "content": "2, 3, 5."},
               {"role": "user", "content": "  And two more?\n"}],
    "tools": [{"role": "system", "content": "Use tools when they help."},
              {"role": "user", "content": "Weather in Zürich?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": "{\"temp\": 4, \"sky\": \"grey\"}"},
              {"role": "assistant", "content": "It is 4 °C and grey."},
              {"role": "user", "content": "Thanks"}],
    "tool_last": [{"role": "user", "content": "Weather in Bern?"},
                  {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
                  {"role": "tool", "content": "sunny"},
                  {"role": "tool", "content": "12 degrees"}],
}
THINKING = {
    "think_in_content": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"},
                         {"role": "user", "content": "3+3?"},
                         {"role": "assistant", "content": "<think>\nsix\n</think>\n\n6"}],
    "reasoning_field": [{"role": "user", "content": "Capital of France?"},
                        {"role": "assistant", "content": "Paris.", "reasoning_content": "Well known."}],
}


def render_cases(tok, names, extra_cases, kwargs):
    cases = []
    for name in names:
        for agp in (True, False):
            cases.append(dict(name=name, messages=CHATS[name], tools=None, kwargs=dict(kwargs),
                              add_generation_prompt=agp))
    cases.append(dict(name="single+tools", messages=CHATS["single"], tools=TOOLS, kwargs=dict(kwargs),
                      add_generation_prompt=True))
    cases.append(dict(name="tools+tools", messages=CHATS["tools"], tools=TOOLS, kwargs=dict(kwargs),
                      add_generation_prompt=True))
    cases += extra_cases
    for c in cases:
        c["text"] = tok.apply_chat_template(c["messages"], tools=c["tools"], tokenize=False,
                                            add_generation_prompt=c["add_generation_prompt"], **c["kwargs"])
        c["ids"] = tok(c["text"], add_special_tokens=False)["input_ids"]
    return cases


STRINGS = [
    "Hello world", "  leading and trailing  ", "numbers 1234567 and 3.14", "don't I'LL we've",
    "tabs\tand\nnewlines\n\n\nhere", "café naïve", unicodedata.normalize("NFD", "café résumé"),
    "中文字符测试", "emoji 🤖🚀", 'code: fn main() { println!("hi"); }',
    "<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "a   b    c\r\n", "unseen words: xylophone quizzical",
]


def write_model(name, cfg_json, tok, template, extra_cases, chat_names, gen, kwargs={}):
    d = f"{OUT}/{name}"
    os.makedirs(d, exist_ok=True)
    cfg_json["vocab_size"] = tok.vocab_size + len(tok.added_tokens_decoder) - len(
        [t for t in tok.added_tokens_decoder if t < tok.vocab_size])
    json.dump(cfg_json, open(f"{d}/config.json", "w"), indent=2)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(d)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    randomize(model, gen)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg_json.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the Hub's tied checkpoints hold the table once
    save_file(state, f"{d}/model.safetensors", metadata={"format": "pt"})
    tok.chat_template = template
    tok.save_pretrained(d)
    for f in ("special_tokens_map.json",):
        if os.path.exists(f"{d}/{f}"):
            os.remove(f"{d}/{f}")
    ids = torch.randint(0, cfg_json["vocab_size"], (1, 24), generator=gen)
    with torch.no_grad():
        logits = model(ids).logits[0].float().contiguous()
    save_file({"input_ids": ids[0].to(torch.int64), "logits": logits}, f"{d}/logits.safetensors")
    # The tokenizer as transformers loads it from the folder (not the object made here).
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(d)
    strings = [dict(text=s, ids=loaded(s, add_special_tokens=False)["input_ids"],
                    ids_special=loaded(s)["input_ids"]) for s in STRINGS]
    cases = render_cases(loaded, chat_names, extra_cases, kwargs)
    json.dump(dict(strings=strings, chats=cases), open(f"{d}/hf.json", "w"), indent=1, ensure_ascii=False)
    print(name, "vocab", cfg_json["vocab_size"], "params", sum(p.numel() for p in model.parameters()))


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    qwen_tk = bpe_tokenizer(QWEN2_RE, True, False, QWEN_SPECIAL)
    llama_tk = bpe_tokenizer(LLAMA3_RE, False, True, LLAMA_SPECIAL)
    llama_tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", llama_tk.token_to_id("<|begin_of_text|>"))])
    qwen = lambda: PreTrainedTokenizerFast(tokenizer_object=qwen_tk, eos_token="<|im_end|>",
                                           pad_token="<|endoftext|>", bos_token=None)
    llama = PreTrainedTokenizerFast(tokenizer_object=llama_tk, bos_token="<|begin_of_text|>",
                                    eos_token="<|eot_id|>")
    common = dict(hidden_act="silu", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.3,
                  torch_dtype="float32", use_cache=True, attention_dropout=0.0)
    base_chats = ["single", "system", "tools", "tool_last"]
    write_model("qwen2", dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", bos_token_id=None,
                              eos_token_id=None, max_position_embeddings=64, max_window_layers=2,
                              rope_theta=1000000.0, sliding_window=32, use_sliding_window=False,
                              tie_word_embeddings=True, **common),
                qwen(), QWEN25_TEMPLATE, [], base_chats, gen)
    thinking = []
    for name in THINKING:
        CHATS[name] = THINKING[name]
    for name, agp, kw in [("think_in_content", False, {}), ("think_in_content", True, {}),
                          ("reasoning_field", True, {"enable_thinking": False}),
                          ("single", True, {"enable_thinking": False}), ("single", True, {"enable_thinking": True}),
                          ("tool_last", True, {"enable_thinking": False})]:
        thinking.append(dict(name=f"{name}+{json.dumps(kw)}", messages=CHATS[name], tools=None, kwargs=kw,
                             add_generation_prompt=agp))
    write_model("qwen3", dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", bos_token_id=None,
                              eos_token_id=None, head_dim=16, attention_bias=False, max_position_embeddings=64,
                              max_window_layers=2, rope_theta=1000000.0, rope_scaling=None, sliding_window=None,
                              use_sliding_window=False, tie_word_embeddings=False, **common),
                qwen(), QWEN3_TEMPLATE, thinking, base_chats, gen)
    date = dict(date_string="03 Dec 2026")
    llama_cases = [dict(name="single+tools+system_tools", messages=CHATS["system"], tools=TOOLS,
                        kwargs=dict(tools_in_user_message=False, **date), add_generation_prompt=True)]
    # Llama 3.2's template allows one tool call per message (no `tool_last`), and every case
    # is rendered with a fixed date (its template otherwise stamps today's).
    write_model("llama32", dict(architectures=["LlamaForCausalLM"], model_type="llama", bos_token_id=None,
                                eos_token_id=None, head_dim=8, attention_bias=False, mlp_bias=False,
                                max_position_embeddings=64, rope_theta=500000.0,
                                rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                                  original_max_position_embeddings=8, rope_type="llama3"),
                                tie_word_embeddings=True, pretraining_tp=1, **common),
                llama, LLAMA32_TEMPLATE, llama_cases, ["single", "system", "tools"], gen, kwargs=date)
    json.dump(dict(transformers=transformers.__version__, torch=torch.__version__,
                   tokenizers=tokenizers.__version__), open(f"{OUT}/versions.json", "w"), indent=1)
    print("transformers", transformers.__version__, "torch", torch.__version__, "tokenizers", tokenizers.__version__)


main()
