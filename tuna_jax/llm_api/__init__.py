"""Calls to OpenAI-compatible endpoints (OpenAI, vLLM, SGLang, llama.cpp), shared by feedback/ and eval/.

store.py: the request store (cache, ledger, budget); client.py: the wire (retries, deadlines, the key kept
secret); replies.py: what makes a reply usable; ask.py: ask a judge until its reply parses.
"""
