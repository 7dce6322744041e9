"""Understanding tasks on top of a trained language model: text classification (`hanlm finetune`,
`hanlm classify`, `POST /v1/classify`), with its data, metrics and classic baselines."""
