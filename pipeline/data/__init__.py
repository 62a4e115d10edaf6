"""Everything between a user's files and token ids: reading and validating data files (files.py; any
JSON a user wrote goes through json_text.py), the record formats of SFT (conversations.py) and of
preferences (preferences.py), chat templates and how a run picks one (templates.py; their Jinja form
in jinja_template.py; the tokenizer's own template in own_template.py), the training/inference
contract checked on every conversation (contract.py), masking (masking.py: the only place labels are
made), packing (packing.py), collators (collators.py), the tokenized SFT and preference datasets
(chat_dataset.py, preference_dataset.py) with the data summary they print (summary.py: records read,
samples made, dropped and cut by reason), and the prompts of the RL stages (prompts.py). No model
code and no training loops live here.
"""
