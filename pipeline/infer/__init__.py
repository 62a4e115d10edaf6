"""Using a trained folder: generation.py is the one generation path (chat, evaluation and RL
rollouts all call it), chat_model.py loads a full or adapter folder and answers with its chat
template, cli.py is the terminal chat and batch-file command (`python -m pipeline.chat`), server.py
the OpenAI-compatible HTTP server (`python -m pipeline.serve`), with protocol.py (request parsing,
OpenAI's error objects), tool_calls.py (each template's call format, parsing answers into OpenAI
tool_calls) and admission.py (limits, the bounded queue, timeouts, disconnect detection) beside it;
webui.py is the browser chat page (`python -m pipeline.webui`). No training code lives here.
"""
