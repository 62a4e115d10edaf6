"""Published chat formats, rendered from each family's official template for the conversations in
tests/test_templates.py (sources named in templates/*.yaml). None = the official template rejects it."""

EXPECTED = {
    "alpaca": {
        "conv_sys": "You are a careful assistant.\n\n### Instruction: Hello, who are you?\n\n### Response: I am a language model.</s>### Instruction: What is 2+2?\n\n### Response: 2+2 equals 4.</s>",
        "conv_nosys": "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction: Hello, who are you?\n\n### Response: I am a language model.</s>### Instruction: What is 2+2?\n\n### Response: 2+2 equals 4.</s>",
        "prompt_sys": "You are a careful assistant.\n\n### Instruction: Hello, who are you?\n\n### Response:",
        "prompt_nosys": "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction: Hello, who are you?\n\n### Response:",
    },
    "baichuan2": {
        "conv_sys": "You are a careful assistant.<reserved_106>Hello, who are you?<reserved_107>I am a language model.<reserved_106>What is 2+2?<reserved_107>2+2 equals 4.",
        "conv_nosys": "<reserved_106>Hello, who are you?<reserved_107>I am a language model.<reserved_106>What is 2+2?<reserved_107>2+2 equals 4.",
        "prompt_sys": "You are a careful assistant.<reserved_106>Hello, who are you?<reserved_107>",
        "prompt_nosys": "<reserved_106>Hello, who are you?<reserved_107>",
    },
    "chatglm3": {
        "conv_sys": "[gMASK]sop<|system|>\n You are a careful assistant.<|user|>\n Hello, who are you?<|assistant|>\n I am a language model.<|user|>\n What is 2+2?<|assistant|>\n 2+2 equals 4.",
        "conv_nosys": "[gMASK]sop<|user|>\n Hello, who are you?<|assistant|>\n I am a language model.<|user|>\n What is 2+2?<|assistant|>\n 2+2 equals 4.",
        "prompt_sys": "[gMASK]sop<|system|>\n You are a careful assistant.<|user|>\n Hello, who are you?<|assistant|>",
        "prompt_nosys": "[gMASK]sop<|user|>\n Hello, who are you?<|assistant|>",
    },
    "chatml": {
        "conv_sys": "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "conv_nosys": "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "prompt_sys": "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
        "prompt_nosys": "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    },
    "deepseek": {
        "conv_sys": "<｜begin▁of▁sentence｜>You are a careful assistant.\n\nUser: Hello, who are you?\n\nAssistant: I am a language model.<｜end▁of▁sentence｜>User: What is 2+2?\n\nAssistant: 2+2 equals 4.<｜end▁of▁sentence｜>",
        "conv_nosys": "<｜begin▁of▁sentence｜>User: Hello, who are you?\n\nAssistant: I am a language model.<｜end▁of▁sentence｜>User: What is 2+2?\n\nAssistant: 2+2 equals 4.<｜end▁of▁sentence｜>",
        "prompt_sys": "<｜begin▁of▁sentence｜>You are a careful assistant.\n\nUser: Hello, who are you?\n\nAssistant:",
        "prompt_nosys": "<｜begin▁of▁sentence｜>User: Hello, who are you?\n\nAssistant:",
    },
    "gemma": {
        "conv_sys": None,
        "conv_nosys": "<bos><start_of_turn>user\nHello, who are you?<end_of_turn>\n<start_of_turn>model\nI am a language model.<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n2+2 equals 4.<end_of_turn>\n",
        "prompt_sys": None,
        "prompt_nosys": "<bos><start_of_turn>user\nHello, who are you?<end_of_turn>\n<start_of_turn>model\n",
    },
    "glm4": {
        "conv_sys": "[gMASK]<sop><|system|>\nYou are a careful assistant.<|user|>\nHello, who are you?<|assistant|>\nI am a language model.<|user|>\nWhat is 2+2?<|assistant|>\n2+2 equals 4.",
        "conv_nosys": "[gMASK]<sop><|user|>\nHello, who are you?<|assistant|>\nI am a language model.<|user|>\nWhat is 2+2?<|assistant|>\n2+2 equals 4.",
        "prompt_sys": "[gMASK]<sop><|system|>\nYou are a careful assistant.<|user|>\nHello, who are you?<|assistant|>",
        "prompt_nosys": "[gMASK]<sop><|user|>\nHello, who are you?<|assistant|>",
    },
    "internlm2": {
        "conv_sys": "<s><|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "conv_nosys": "<s><|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "prompt_sys": "<s><|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
        "prompt_nosys": "<s><|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    },
    "llama2": {
        "conv_sys": "<s>[INST] <<SYS>>\nYou are a careful assistant.\n<</SYS>>\n\nHello, who are you? [/INST] I am a language model. </s><s>[INST] What is 2+2? [/INST] 2+2 equals 4. </s>",
        "conv_nosys": "<s>[INST] Hello, who are you? [/INST] I am a language model. </s><s>[INST] What is 2+2? [/INST] 2+2 equals 4. </s>",
        "prompt_sys": "<s>[INST] <<SYS>>\nYou are a careful assistant.\n<</SYS>>\n\nHello, who are you? [/INST]",
        "prompt_nosys": "<s>[INST] Hello, who are you? [/INST]",
    },
    "llama3": {
        "conv_sys": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello, who are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am a language model.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n2+2 equals 4.<|eot_id|>",
        "conv_nosys": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello, who are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am a language model.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n2+2 equals 4.<|eot_id|>",
        "prompt_sys": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello, who are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "prompt_nosys": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello, who are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    },
    "mistral": {
        "conv_sys": "<s> [INST] You are a careful assistant.\n\nHello, who are you? [/INST] I am a language model.</s> [INST] What is 2+2? [/INST] 2+2 equals 4.</s>",
        "conv_nosys": "<s> [INST] Hello, who are you? [/INST] I am a language model.</s> [INST] What is 2+2? [/INST] 2+2 equals 4.</s>",
        "prompt_sys": "<s> [INST] You are a careful assistant.\n\nHello, who are you? [/INST]",
        "prompt_nosys": "<s> [INST] Hello, who are you? [/INST]",
    },
    "phi3": {
        "conv_sys": "<|system|>\nYou are a careful assistant.<|end|>\n<|user|>\nHello, who are you?<|end|>\n<|assistant|>\nI am a language model.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n2+2 equals 4.<|end|>\n<|endoftext|>",
        "conv_nosys": "<|user|>\nHello, who are you?<|end|>\n<|assistant|>\nI am a language model.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n2+2 equals 4.<|end|>\n<|endoftext|>",
        "prompt_sys": "<|system|>\nYou are a careful assistant.<|end|>\n<|user|>\nHello, who are you?<|end|>\n<|assistant|>\n",
        "prompt_nosys": "<|user|>\nHello, who are you?<|end|>\n<|assistant|>\n",
    },
    "qwen": {
        "conv_sys": "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "conv_nosys": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "prompt_sys": "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
        "prompt_nosys": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    },
    "vicuna": {
        "conv_sys": "You are a careful assistant. USER: Hello, who are you? ASSISTANT: I am a language model.</s>USER: What is 2+2? ASSISTANT: 2+2 equals 4.</s>",
        "conv_nosys": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Hello, who are you? ASSISTANT: I am a language model.</s>USER: What is 2+2? ASSISTANT: 2+2 equals 4.</s>",
        "prompt_sys": "You are a careful assistant. USER: Hello, who are you? ASSISTANT:",
        "prompt_nosys": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Hello, who are you? ASSISTANT:",
    },
    "yi": {
        "conv_sys": "You are a careful assistant.<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "conv_nosys": "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a language model.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n",
        "prompt_sys": "You are a careful assistant.<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
        "prompt_nosys": "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    },
    "yuan2": {
        "conv_sys": None,
        "conv_nosys": None,
        "prompt_sys": "You are a careful assistant.\nHello, who are you?<sep>",
        "prompt_nosys": "Hello, who are you?<sep>",
    },
}

QWEN_TOOLS = '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat\'s the weather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 18}\n</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 18 degrees in Paris.<|im_end|>\n'
GLM4_TOOLS = '[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n## get_weather\n\n{\n    "name": "get_weather",\n    "description": "Get the weather for a city",\n    "parameters": {\n        "type": "object",\n        "properties": {\n            "city": {\n                "type": "string"\n            }\n        },\n        "required": [\n            "city"\n        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nWhat\'s the weather in Paris?<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"temp": 18}<|assistant|>\nIt is 18 degrees in Paris.'
