"""Concepts: the ImageNet classifier's classes as caption words, read by the decoder and copied."""

import torch

from captioner.decoding import SpecialIds, generate
from captioner.models.concepts import NUM_CLASSES, ConceptMap, class_word, definition_head, imagenet_classes
from captioner.models.decoder import AttentionDecoder, DecoderConfig
from captioner.models.encoder import Encoder, EncoderConfig
from captioner.options import DecodeOptions

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "dog", "horse", "bench", "boat", "bicycle", "bike", "car", "a", "man"]


def test_every_class_is_mapped_or_listed_as_unmapped():
    classes = imagenet_classes()
    assert len(classes) == NUM_CLASSES and all(lemmas and definition for lemmas, definition in classes)
    concepts = ConceptMap.build({w: 10 for w in WORDS[4:]})
    summary = concepts.summary()
    mapped = [w for w in concepts.words if w is not None]
    assert summary["mapped"] == len(mapped) and summary["mapped"] + len(summary["unmapped"]) == NUM_CLASSES
    assert set(mapped) <= set(WORDS) and summary["words"] == len(set(mapped))
    ids = concepts.ids({w: i for i, w in enumerate(WORDS)})
    assert [i for i in ids if i < 0].__len__() == len(summary["unmapped"])
    assert "tench" in summary["unmapped"]  # a fish this vocabulary cannot say


def test_the_definitions_head_noun_is_found():
    assert definition_head("a horse of a brownish orange to light brown color") == "horse"
    assert definition_head("a breed of tiny short-haired dog with protruding eyes") == "dog"
    assert definition_head("any of several large eared seals of the northern Pacific") == "seals"
    assert definition_head("long narrow flat-bottomed boat propelled by sculling") == "boat"
    assert definition_head("a bench in a public park") == "bench"


def test_known_classes_map_to_the_words_people_use():
    classes = imagenet_classes()
    # How often Flickr8k's training captions say each word.
    vocabulary = {"dog": 8000, "horse": 250, "bench": 150, "boat": 202, "bicycle": 294, "bike": 648, "car": 321,
                  "canoe": 52, "basketball": 271, "ball": 1335, "two": 9000}  # fmt: skip
    by_lemma = {lemmas[0]: (i, lemmas, d) for i, (lemmas, d) in enumerate(classes)}
    expected = {
        "sorrel": "horse",  # by its definition's head noun
        "park bench": "bench",
        "speedboat": "boat",  # "a fast motorboat": a compound ending in a caption word
        "mountain bike": "bike",  # "bike" is said more than "a bicycle with a sturdy frame"
        "canoe": "boat",  # "small and light boat": the word people use more than "canoe"
        "basketball": "basketball",  # a name people use often enough, though "ball" is said more
        "bicycle-built-for-two": "bicycle",  # not "two"
        "cab": "car",
        "sports car": "car",
        "golden retriever": "dog",  # the reviewed table of dog breeds
        "tench": None,
    }
    assert {name: class_word(*by_lemma[name], vocabulary) for name in expected} == expected


def test_a_concept_encoder_appends_the_classifiers_probabilities_to_its_grid():
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=32, pool_grid=2, concepts=True)).freeze()
    features = encoder(torch.randn(3, 3, 32, 32))
    assert encoder.grid_dim == 512 * 4 and features.shape == (3, encoder.grid_dim + NUM_CLASSES)
    probabilities = features[:, encoder.grid_dim :]
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))
    plain = Encoder(EncoderConfig(name="resnet18", image_size=32, pool_grid=2))
    assert plain.feature_dim == plain.grid_dim == 512 * 4 and plain.classifier is None


def _copying_decoder(seed=0):
    torch.manual_seed(seed)
    classes = 8
    ids = tuple([WORDS.index(w) for w in ("dog", "horse", "bench", "boat", "bicycle")] + [-1] * (classes - 5))
    config = DecoderConfig(feature_dim=4 + classes, vocab_size=len(WORDS), embed_dim=6, hidden_size=32, dropout=0.0, concept_ids=ids)
    return AttentionDecoder(config, torch.randn(len(WORDS), 6), pad_id=0), classes


def test_the_decoder_says_a_concept_no_training_caption_paired_with_an_image():
    """Captions "a <object>" where the object is what the classifier sees: trained on four of
    five objects, the decoder says the fifth ("bicycle", never a target) by copying it."""
    decoder, classes = _copying_decoder()
    generator = torch.Generator().manual_seed(0)

    def batch(objects):
        seen = torch.tensor(objects)
        probabilities = torch.full((len(objects), classes), 0.02).index_put_((torch.arange(len(objects)), seen), torch.tensor(0.86))
        features = torch.cat([torch.randn(len(objects), 4, generator=generator), probabilities], dim=1)
        words = [WORDS.index(w) for w in ("dog", "horse", "bench", "boat", "bicycle")]
        ids = torch.tensor([[1, WORDS.index("a"), words[o], 2] for o in objects])
        return features, ids

    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(150):
        features, ids = batch(torch.randint(0, 4, (32,), generator=generator).tolist())  # never object 4
        log_probs = decoder(features, ids[:, :-1])
        loss = torch.nn.functional.nll_loss(log_probs.transpose(1, 2), ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    features, _ = batch([4, 0, 3])
    ids = SpecialIds(start=1, end=2, pad=0, unk=3)
    said = [" ".join(WORDS[t] for t in h[0].tokens[:-1]) for h in generate(decoder, features, DecodeOptions(max_length=4), ids)]
    assert said == ["a bicycle", "a dog", "a boat"]
    # Without the concepts' probabilities (unmapped classes only) it cannot know which object.
    blind = features.clone()
    blind[:, 4:9] = 0.0
    blind[:, 9:] = 1 / 3
    told = [" ".join(WORDS[t] for t in h[0].tokens[:-1]) for h in generate(decoder, blind, DecodeOptions(max_length=4), ids)]
    assert "a bicycle" not in told
