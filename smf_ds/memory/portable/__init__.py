"""The files a merged SMF model directory carries beside its weights (`save_merged`), so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` builds the SMF model where
smf-ds is not installed. They import only torch, transformers and each other (relatively);
smf_ds.memory builds its own layers from product_keys.py, so both run the same code.
"""
