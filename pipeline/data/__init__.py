"""Everything between a user's files and token ids: reading and validating data files (files.py; any
JSON a user wrote goes through json_text.py), the record formats of SFT (conversations.py) and of
preferences (preferences.py), chat templates and how a run picks one (templates.py; a template
of fields compiled to Jinja in jinja_template.py; rendering.py renders every template through
the tokenizer, the one renderer of training and inference), masking (masking.py: the only place
labels are made), packing (packing.py), collators (collators.py), the tokenized SFT and preference
datasets (chat_dataset.py, preference_dataset.py) with the data summary they print (summary.py:
records read, samples made, dropped and cut by reason), and the prompts of the RL stages
(prompts.py). No model code and no training loops live here.
"""
