"""data.HFTokenizer against transformers' own tokenizers, on small tokenizers trained here (nothing downloads)."""
import base64
import io
import json
import random

import pytest
import torch

import data

transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

ROOTS = ['hello', 'world', 'scaling', 'law', 'the', 'there', 'straße', 'café', 'naïve', 'zürich', 'ocr', 'reading',
         'señor', 'garçon', 'élan', 'over', 'under', 'text', 'image', 'word']


def make_words(n, seed):
    """Mixed case, digits, punctuation, accented letters, characters the tokenizers never saw, a few phrases."""
    rng = random.Random(seed)
    out = ['', 'A', 'ß', '½', 'x²', 'QXZ', '東京', "it's", 'don\'t', 'a_b', 'Hello , world .', '  two  spaces ']
    while len(out) < n:
        w = rng.choice(ROOTS)
        w = rng.choice([w, w.upper(), w.title(), w[:3] + w[3:].upper()])
        w = rng.choice(['', '(', '"', '#', '¿']) + w
        w += rng.choice(['', '.', ',', '!', "'s", ':', '-2', '%', '€', '…'])
        if rng.random() < 0.3:
            w = w[:2] + str(rng.randrange(1000)) + w[2:]
        if rng.random() < 0.1:
            w += ' ' + rng.choice(ROOTS) + rng.choice(['', ' 42'])
        out.append(w)
    return out


def corpus(n=3000):
    return [' '.join(make_words(6, i)[-5:]) for i in range(n)]


def spec_of(folder, tok, max_len=64):
    """The spec model.py's converter writes: the folder's tokenizer files, ours -> transformers' id table."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name.endswith('.model'):
            files[p.name] = base64.b64encode(p.read_bytes()).decode()
        elif p.name in ('tokenizer.json', 'vocab.json', 'merges.txt', 'tokenizer_config.json',
                        'special_tokens_map.json'):
            files[p.name] = p.read_text(encoding='utf-8')
    eos, bos, pad = tok.eos_token_id, tok.bos_token_id, tok.pad_token_id
    ids = [eos] + [i for i in range(len(tok)) if i not in (eos, bos, pad)] + [bos, pad]
    return json.loads(json.dumps({'type': 'hf', 'files': files, 'ids': ids, 'max_len': max_len}))


def compare(spec, tok, words, seed=0):
    """Encode ids and decoded text of words, and decoded text of random id rows, as transformers gives them."""
    ours = data.load_tokenizer(spec)
    hf = spec['ids']
    assert ours.spec == spec and not ours.fold and ours.vocab_size == len(hf) and len(ours.tokens) == len(hf) - 3
    theirs = [tok(w, add_special_tokens=False).input_ids for w in words]
    assert sum(len(t) > 2 for t in theirs) > len(words) // 4  # not a trivial comparison
    assert [[hf[i] for i in ours.ids(w)] for w in words] == theirs
    rows = ours.encode(words)
    assert (rows[:, 0] == ours.bos_id).all() and ours.eos_id == 0
    assert ours.decode(rows) == [tok.decode(t, skip_special_tokens=True).strip() for t in theirs]
    rng = random.Random(seed)  # what a model may predict: any text tokens, in any order
    rows = [[rng.randrange(1, ours.bos_id) for _ in range(rng.randrange(1, 8))] for _ in range(300)]
    decoded = ours.decode(torch.tensor([r + [ours.eos_id] * (8 - len(r)) for r in rows]))
    assert decoded == [tok.decode([hf[i] for i in r], skip_special_tokens=True).strip() for r in rows]
    return ours


def _fields(b):
    """(field number, value) of a serialized protobuf message (no protobuf package needed)."""
    def varint(i):
        n = shift = 0
        while True:
            n, shift, i = n | (b[i] & 127) << shift, shift + 7, i + 1
            if b[i - 1] < 128:
                return n, i
    i = 0
    while i < len(b):
        key, i = varint(i)
        if key & 7 == 0:
            v, i = varint(i)
        elif key & 7 == 2:
            n, i = varint(i)
            v, i = b[i:i + n], i + n
        else:
            v, i = b[i:i + (8 if key & 7 == 1 else 4)], i + (8 if key & 7 == 1 else 4)
        yield key >> 3, v


@pytest.fixture(scope='module')
def spm_model():
    spm = pytest.importorskip('sentencepiece')
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=400,
                                   model_type='unigram', hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def xlmr_from_spm(model):
    """transformers' XLMRobertaTokenizer of a sentencepiece.bpe.model, built as from_pretrained builds it
    (SentencePieceExtractor + XLMRobertaConverter.convert_from_spm), which needs protobuf only to read the file."""
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import XLMRobertaConverter
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    normalizer = next(v for f, v in _fields(model) if f == 3)
    charsmap = next((v for f, v in _fields(normalizer) if f == 2), None)
    assert charsmap  # nmt_nfkc, as XLM-R's
    return transformers.XLMRobertaTokenizer(**XLMRobertaConverter.convert_from_spm(vocab=vocab),
                                            _spm_precompiled_charsmap=charsmap)


def test_sentencepiece_model(tmp_path, spm_model):
    (tmp_path / 'sentencepiece.bpe.model').write_bytes(spm_model)
    config = {'tokenizer_class': 'XLMRobertaTokenizer', 'clean_up_tokenization_spaces': True}
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
    tok = xlmr_from_spm(spm_model)
    tok.clean_up_tokenization_spaces = True
    spec = spec_of(tmp_path, tok)
    assert set(spec['files']) == {'sentencepiece.bpe.model', 'tokenizer_config.json'}
    ours = compare(spec, tok, make_words(300, 1))
    assert ours.decode(ours.encode(['Hello', 'world.'])) == ['Hello', 'world.']
    assert ours._sp is not None
    config['tokenizer_class'] = 'T5Tokenizer'
    spec['files']['tokenizer_config.json'] = json.dumps(config)
    with pytest.raises(ValueError, match='tokenizer_class T5Tokenizer is not supported'):
        data.load_tokenizer(spec)


def test_tokenizer_json_unigram(tmp_path, spm_model):
    xlmr_from_spm(spm_model).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    spec = spec_of(tmp_path, tok)
    assert json.loads(spec['files']['tokenizer.json'])['model']['type'] == 'Unigram'
    ours = compare(spec, tok, make_words(300, 2))
    assert ours._kind == 'Unigram'
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / 'tokenizer.json'), bos_token='<s>',
                                                eos_token='</s>', pad_token='<pad>')
    compare(spec, fast, make_words(100, 3))


@pytest.fixture(scope='module')
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('bpe')
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=600, min_frequency=2,
                            special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'], show_progress=False)
    bpe.save_model(str(folder))
    return folder


@pytest.mark.parametrize('prefix', [False, True])
def test_byte_level_bpe_files(tmp_path, bpe_folder, prefix):
    for name in ('vocab.json', 'merges.txt'):
        (tmp_path / name).write_bytes((bpe_folder / name).read_bytes())
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'RobertaTokenizer',
                                                                'add_prefix_space': prefix}))
    tok = transformers.RobertaTokenizer.from_pretrained(tmp_path)
    assert tok.add_prefix_space == prefix
    spec = spec_of(tmp_path, tok)
    assert set(spec['files']) == {'vocab.json', 'merges.txt', 'tokenizer_config.json'}
    ours = compare(spec, tok, make_words(300, 4))
    assert ours._kind == 'BPE' and ours.decode(ours.encode(['Hello'])) == ['Hello']


def test_tokenizer_json_byte_level_bpe(tmp_path, bpe_folder):
    transformers.RobertaTokenizer(vocab=str(bpe_folder / 'vocab.json'),
                                  merges=str(bpe_folder / 'merges.txt')).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    spec = spec_of(tmp_path, tok)
    assert json.loads(spec['files']['tokenizer.json'])['model']['type'] == 'BPE'
    compare(spec, tok, make_words(300, 5))


def test_refusals():
    with pytest.raises(ValueError, match='needs tokenizer.json'):
        data.load_tokenizer({'type': 'hf', 'files': {'tokenizer_config.json': '{}'}, 'ids': [0, 1, 2]})
    wordpiece = {'model': {'type': 'WordPiece', 'vocab': {}}, 'pre_tokenizer': None}
    with pytest.raises(ValueError, match='WordPiece model is not supported'):
        data.load_tokenizer({'type': 'hf', 'files': {'tokenizer.json': json.dumps(wordpiece)}, 'ids': [0, 1, 2]})
    unigram = {'model': {'type': 'Unigram', 'vocab': [['a', -1.0]]}, 'pre_tokenizer': {'type': 'Whitespace'}}
    with pytest.raises(ValueError, match='pre-tokenizer Whitespace is not supported'):  # when made, not at a label
        data.load_tokenizer({'type': 'hf', 'files': {'tokenizer.json': json.dumps(unigram)}, 'ids': [0, 1, 2]})


POOL = list("aZs'tdm_ 09.,!-é") + ['ß', 'Ж', 'Σ', '東', '²', '½', 'Ⅻ', '٣', '\u0301', '🙂', '▁', '\t', '\n', '\xa0',
                                   '\u3000', '\u2009', '\x1c', 'ﬁ', 'Å', "'s", "'ll", '  ']


def random_texts(n, seed):
    rng = random.Random(seed)
    return [''.join(rng.choice(POOL) for _ in range(rng.randrange(12))) for _ in range(n)]


def test_pre_tokenizers_and_normalizers_match_tokenizers():
    from tokenizers import Regex, normalizers as nm, pre_tokenizers as pt
    texts = random_texts(500, 6)
    for pre in [pt.ByteLevel(add_prefix_space=False), pt.ByteLevel(add_prefix_space=True),
                pt.ByteLevel(add_prefix_space=True, use_regex=False), pt.WhitespaceSplit(),
                pt.Sequence([pt.WhitespaceSplit(), pt.Metaspace(prepend_scheme='always')]),
                pt.Metaspace(prepend_scheme='first'), pt.Metaspace(prepend_scheme='never', split=False)]:
        spec = json.loads(pre.__getstate__())
        assert [data._pre_tokenize(spec, [t]) for t in texts] == [[w for w, _ in pre.pre_tokenize_str(t)]
                                                                  for t in texts], spec
    for norm in [nm.Sequence([nm.Replace(Regex(r'\A +| +\z'), ''), nm.Replace(Regex(' {2,}'), ' '),
                              nm.Replace(' ', '▁'), nm.Prepend('▁')]),
                 nm.Sequence([nm.NFKC(), nm.Lowercase(), nm.Strip()]), nm.NFD(), nm.NFC(), nm.NFKD(),
                 nm.Strip(left=False, right=True)]:
        spec = json.loads(norm.__getstate__())
        assert [data._normalize(spec, t) for t in texts] == [norm.normalize_str(t) for t in texts], spec


def test_unigram_unknowns_and_ties(tmp_path):
    """A hand-made Unigram: an unknown character (score min - 10) against a longer piece, and equal-score paths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers as pt
    vocab = [('<s>', 0.0), ('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('▁', -1.0), ('a', 10.0), ('ab', -15.0),
             ('x', -1.0), ('y', -1.0), ('xy', -2.0), ('q', -20.0), ('▁xy', -3.0), ('▁x', -2.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3))
    backend.pre_tokenizer, backend.decoder = pt.Metaspace(), decoders.Metaspace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<s>', eos_token='</s>',
                                               pad_token='<pad>', unk_token='<unk>')
    tok.save_pretrained(tmp_path)
    words = ['ab', 'b', 'abab', 'xy', 'axy', 'xyxy', 'bbq', 'a b', 'yx', 'qab', 'zzz ab', 'xyab']
    ours = compare(spec_of(tmp_path, tok), tok, words)
    assert [[ours.spec['ids'][i] for i in ours.ids(w)] for w in ['ab', 'axy']] == [[4, 6], [4, 5, 9]]
