"""`hanlm finetune`: training for the understanding tasks of `hanlm.tasks`, from a pretrained checkpoint
(`run.Finetuner`) or by counting (`counted`: the hmm and crf taggers). Its torchrun worker is
`python -m hanlm.finetune`."""
