# ruff: noqa: RUF001  (look-alike characters are the point of these test strings)
"""Texts to compare our CLIP tokenizer with OpenAI's: curated edge cases plus a seeded generator.

No expected outputs live here: tests/test_tokenizer.py runs OpenAI's ``simple_tokenizer.py`` on every text.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable

SPECIALS = ("<|startoftext|>", "<|endoftext|>")

_WORDS_TEXT = (
    "a photo of a cat dog bird car tree house person people man woman child the on in with and or is are "
    "red green blue yellow black white big small old new sitting standing running playing beach mountain "
    "city street food pizza plate table chair computer keyboard phone screen picture painting drawing "
    "diagram supercalifragilisticexpialidocious antidisestablishmentarianism "
    "pneumonoultramicroscopicsilicovolcanoconiosis don't can't won't it's they're we've i'm you'll he'd "
    "she'd o'clock rock'n'roll naïve café résumé façade coöperate jalapeño straße größe œuvre ångström "
    "ærø zürich"
)
WORDS = tuple(_WORDS_TEXT.split())

SCRIPTS = {
    "cjk": "東京の公園で赤いボールで遊んでいる犬の写真 北京 上海 漢字 简体字 繁體字 日本語 ひらがな カタカナ",
    "korean": "서울 강아지 고양이 사진 한국어 텍스트 ㄱㄴㄷ 가나다",
    "arabic": "مرحبا بالعالم صورة قطة كلب ١٢٣ العربية",
    "hebrew": "שלום עולם תמונה של חתול עִבְרִית",
    "devanagari": "नमस्ते दुनिया बिल्ली की तस्वीर हिन्दी क्षत्रिय १२३",
    "thai": "สวัสดีชาวโลก ภาพแมว ภาษาไทย ๑๒๓",
    "cyrillic": "Привет мир фотография кошки Ёжик ЁЛКА",
    "greek": "Γειά σου κόσμε φωτογραφία γάτας ΣΊΣΥΦΟΣ ὅσος ᾳ ῳ",
    "other": "Բարեւ ქართული ሰላም தமிழ் বাংলা ગુજરાતી ਪੰਜਾਬੀ ᏣᎳᎩ ᠮᠣᠩᠭᠣᠯ ꦗꦮ 𐌰𐌱 𝐀𝐁𝐂 𝔄𝔅 ℌℑ",
}

EMOJI = (
    "🙂",
    "😀",
    "🐱",
    "🐶",
    "🍕",
    "🚗",
    "❤️",
    "❤",
    "✨",
    "👍",
    "👍🏽",
    "👍🏿",
    "👩‍👩‍👧‍👦",
    "👨‍💻",
    "🧑🏾‍🚀",
    "🏳️‍🌈",
    "🇫🇷",
    "🇯🇵",
    "🇺🇸",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "1️⃣",
    "#️⃣",
    "©️",
    "™",
    "☺︎",
    "🫠",
    "🪿",
)

PUNCTUATION = (
    "!",
    "?",
    "!!!???",
    "...",
    "…",
    "—",
    "–",
    "-",
    "--",
    ",",
    ".",
    ";",
    ":",
    "'",
    '"',
    "“",
    "”",
    "‘",
    "’",
    "«",
    "»",
    "¿",
    "¡",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "<",
    ">",
    "<|",
    "|>",
    "|",
    "/",
    "\\",
    "#",
    "@",
    "$",
    "%",
    "^",
    "&",
    "*",
    "_",
    "=",
    "+",
    "~",
    "`",
    "§",
    "¶",
    "•",
    "·",
    "°",
    "€",
    "£",
    "¥",
    "₿",
    "※",
    "†",
    "‰",
    "′",
    "″",
    "ʼ",
    "＂",
)

NUMBERS = (
    "0",
    "7",
    "42",
    "2024",
    "3.14",
    "1,000,000",
    "1e-9",
    "-17",
    "½",
    "¾",
    "²",
    "³",
    "Ⅻ",
    "ⅷ",
    "①",
    "١٢٣",
    "۱۲۳",
    "๑๒๓",
    "१२३",
    "１２３",
    "০১২",
    "𝟘𝟙",
    "〇",
    "二十",
)

ENTITIES = (
    "&amp;",
    "&amp;amp;",
    "&amp;amp;amp;",
    "&lt;",
    "&gt;",
    "&quot;",
    "&#39;",
    "&#x27;",
    "&nbsp;",
    "&eacute;",
    "&#233;",
    "&#xE9;",
    "&#128512;",
    "&#x1F600;",
    "&#0;",
    "&#x110000;",
    "&#xd800;",
    "&#128;",
    "&#x85;",
    "&#1;",
    "&lt;|endoftext|&gt;",
    "&amp;lt;|startoftext|&amp;gt;",
    "&ampamp;",
    "&notit;",
    "&copy",
    "&#65",
    "&hellip;",
    "&#x345;",
    "&#x17f;",
    "&#xfb06;",
    "&#x2028;",
    "&#12288;",
    "&#x200b;",
)

WHITESPACE = (
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\x0b",
    "\x0c",
    "\x85",
    "\xa0",
    "\u1680",
    "\u2000",
    "\u2007",
    "\u200a",
    "\u2028",
    "\u2029",
    "\u202f",
    "\u205f",
    "\u3000",
)

INVISIBLE = (
    "\x00",
    "\x01",
    "\x08",
    "\x1b",
    "\x1c",
    "\x1f",
    "\x7f",
    "\x80",
    "\x9f",
    "\u200b",
    "\u200c",
    "\u200d",
    "\u2060",
    "\ufeff",
    "\u00ad",
    "\u180e",
    "\u061c",
    "\u200e",
    "\u200f",
    "\u202e",
    "\ufe0f",
    "\U000e0041",
    "\ufffd",
    "\ufffe",
    "\uffff",
    "\ue000",
    "\U000f0000",
)

COMBINING = (
    "\u0301",
    "\u0300",
    "\u0308",
    "\u0327",
    "\u0345",
    "\u0303\u0304\u0306",
    "\u20dd",
    "\u0e31",
    "\u093f",
)

MOJIBAKE_SOURCES = (
    "café",
    "naïve",
    "“quoted”",
    "it’s",
    "—dash—",
    "Zürich",
    "🙂 smile",
    "日本",
    "Ωmega",
    "señor",
    "€100",
)

CURATED: tuple[str, ...] = (
    "",
    " ",
    "   ",
    "\t\n\r",
    "\u3000\xa0\u2028",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "A Photo Of A Cat.",
    # literal special tokens, where OpenAI's regex does and does not see them
    "<|startoftext|>",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "<|startoftext|>a photo<|endoftext|>",
    "a photo <|endoftext|> of a cat",
    "a<|endoftext|>b",
    "1<|endoftext|>2",
    "!<|endoftext|>",
    "<|endoftext|>!",
    "x'<|endoftext|>",
    "'s<|endoftext|>",
    "it's<|endoftext|>",
    "<<|endoftext|>>",
    "<|endoftext|",
    "|endoftext|>",
    "< |endoftext| >",
    "<|ENDOFTEXT|>",
    "<|EndOfText|> <|StartOfText|>",
    "<|ſtartoftext|>",
    "<|endoftext|>\u0345<|endoftext|>",
    "\u0345<|endoftext|>",
    "<|endoftext|>" * 100,
    # contractions
    "it's it’s it‘s it`s itʼs it′s IT'S It'S",
    "they're we've i'm you'll he'd don't can't won't o'clock",
    "'s 't 're 've 'm 'll 'd ' s 'S 'ſ 'ſs ''s '''",
    "rock'n'roll y'all'd've",
    # numbers and punctuation
    "3.14159 1,000,000 2024-01-31 12:30pm $5.99 50% #1 No.7",
    "!!!???... --- *** ### @@@ ~~~ ,,, ;;; :::",
    "¡¿«»‹›„“”‚‘’",
    # urls, emails, code
    "https://example.com/path/to/image.jpg?size=large&v=2#top",
    "http://user:pass@sub.domain.co.uk:8080/a%20b",
    "someone+tag@example.org",
    "def f(x): return x**2 if x > 0 else -x  # comment",
    "<div class='photo'>a cat</div>",
    '{"caption": "a dog", "tags": [1, 2, 3]}',
    "x != y && a <= b || c >= d; i++; j--; k ^= 1;",
    "SELECT * FROM images WHERE label = 'cat';",
    # full-width, half-width, ligatures, compatibility forms
    "ＡＢＣ ａｂｃ １２３ ！？ ＃＠",
    "ｶﾀｶﾅ ﾊﾝｶｸ",
    "ﬁne ﬂower ﬀ ﬃ ﬄ ﬅ ﬆ Ĳ ĳ",
    "㍻ ㎏ ℃ ℉ № ™ Å K",
    # NFC / NFD pairs
    "café",
    unicodedata.normalize("NFD", "café"),
    "Å Å Å",
    unicodedata.normalize("NFD", "Ωμέγα Ἀθῆναι"),
    "e\u0301\u0301\u0301 a\u0308\u0304",
    # mojibake ftfy repairs
    "cafÃ©",
    "Ã¢â‚¬Å“quotedÃ¢â‚¬Â",
    "itâ€™s",
    "â€œmojibakeâ€\x9d",
    "ðŸ™‚",
    "Ã¼ber",
    # control, zero-width, bidi
    "a\x00b\x01c\x1fd\x7fe",
    "a\u200bb\u200cc\u200dd\ufeffe",
    "\u202eevil\u202c text",
    "soft\u00adhyphen",
    # emoji
    "👩‍👩‍👧‍👦 family 👨‍💻 coder 🧑🏾‍🚀 astronaut",
    "🇫🇷🇯🇵🇺🇸 flags 🏳️‍🌈 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "👍👍🏻👍🏼👍🏽👍🏾👍🏿",
    "🙂" * 80,
    # long words and long texts
    "a" * 1000,
    "supercalifragilisticexpialidocious" * 10,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "the quick brown fox jumps over the lazy dog " * 10,
    " ".join(str(i) for i in range(60)),
    "word " * 74,
    "word " * 75,
    "word " * 76,
    "a " * 200,
)


def mojibake(text: str, encoding: str) -> str:
    """UTF-8 bytes read as a single-byte code page: the classic damage ftfy undoes."""
    return text.encode("utf-8").decode(encoding, errors="replace")


def random_code_point(rng: random.Random) -> str:
    """Any scalar value (no surrogates), weighted towards the BMP."""
    while True:
        cp = rng.randrange(0x10000) if rng.random() < 0.7 else rng.randrange(0x10000, 0x110000)
        if not 0xD800 <= cp < 0xE000:
            return chr(cp)


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "’s", "'S", "'ſ", "n't")


def random_word(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    return rng.choice((word, word, word.upper(), word.capitalize()))


# (weight, atom maker): mostly words, with every kind of oddity mixed in.
ATOM_KINDS: tuple[tuple[int, Callable[[random.Random], str]], ...] = (
    (30, random_word),
    (8, lambda rng: rng.choice(rng.choice(list(SCRIPTS.values())).split())),
    (5, lambda rng: rng.choice(EMOJI)),
    (8, lambda rng: rng.choice(PUNCTUATION)),
    (6, lambda rng: rng.choice(NUMBERS)),
    (4, lambda rng: rng.choice(ENTITIES)),
    (3, lambda rng: rng.choice(INVISIBLE)),
    (3, lambda rng: rng.choice(WHITESPACE)),
    (3, lambda rng: rng.choice(WORDS)[:4] + rng.choice(COMBINING)),
    (3, lambda rng: mojibake(rng.choice(MOJIBAKE_SOURCES), rng.choice(("cp1252", "latin-1")))),
    (1, lambda rng: rng.choice(SPECIALS)),
    (5, lambda rng: "".join(random_code_point(rng) for _ in range(rng.randrange(1, 6)))),
    (4, lambda rng: rng.choice(CONTRACTIONS)),
)


def random_atom(rng: random.Random) -> str:
    (make,) = rng.choices([make for _, make in ATOM_KINDS], weights=[w for w, _ in ATOM_KINDS])
    return make(rng)


def random_text(rng: random.Random) -> str:
    atoms = [random_atom(rng) for _ in range(rng.randrange(1, 30))]
    separators = [rng.choice(("", " ", " ", " ", "  ", rng.choice(WHITESPACE))) for _ in atoms]
    text = "".join(sep + atom for sep, atom in zip(separators, atoms, strict=True))
    roll = rng.random()
    if roll < 0.05:
        text = unicodedata.normalize("NFD", text)
    elif roll < 0.1:
        text = text.upper()
    elif roll < 0.15:
        text = mojibake(text, "cp1252")
    return text


def generated_cases(count: int, seed: int = 20240217) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(count)]


def all_cases(generated: int = 5000) -> list[str]:
    """The curated cases, each script sample, then ``generated`` seeded random texts."""
    return [*CURATED, *SCRIPTS.values(), *generated_cases(generated)]


# ---------------------------------------------------------------- near-ASCII texts (clean_text's ftfy skip)

PRINTABLE_ASCII = (*(chr(cp) for cp in range(0x20, 0x7F)), "\t", "\n")
# What ftfy's fixers act on, at or near ASCII: entities (with and without ";", upper case, numeric), markup,
# line breaks, terminal escapes, C0 and C1 controls, and a few non-ASCII characters it rewrites.
ASCII_ODDITIES = (
    "&", "&amp;", "&AMP;", "&amp", "&lt;", "&gt;", "&#39;", "&#x41;", "&#65", "&quot;", "&nbsp;", "&eacute;",
    "&EACUTE;", "&copy", "&not that", "&#x2019;", "&hellip;", "<", ">", "<b>", "</p>", "\r\n", "\r", "\n\r",
    "\x1b[31m", "\x1b[0m", "\x1b[1;32m", "\x1b", "\x1b]", "\x00", "\x07", "\x08", "\x0b", "\x0c", "\x0e",
    "\x1f", "\x7f", "\x80", "\x85", "\x9d", "\xa0", "\u2028", "\u2029", "\ufeff", "Ã©", "â€™", "ï¬",
    "\ufb01", "\uff2c", "\u3000", "\u201c", "\u2019", "e\u0301", "  ",
)


def near_ascii_text(rng: random.Random) -> str:
    """Runs of printable ASCII (tab and line feed included), words, and now and then one of ``ASCII_ODDITIES``."""
    parts = []
    for _ in range(rng.randrange(0, 14)):
        roll = rng.random()
        if roll < 0.55:
            parts.append("".join(rng.choices(PRINTABLE_ASCII, k=rng.randrange(1, 9))))
        elif roll < 0.85:
            parts.append(random_word(rng).encode("ascii", errors="ignore").decode() + rng.choice((" ", "", "\n")))
        else:
            parts.append(rng.choice(ASCII_ODDITIES))
    return "".join(parts)


def near_ascii_cases(count: int, seed: int = 20261201) -> list[str]:
    """Every pair of ASCII characters (C0 controls and DEL included), then ``count`` seeded random texts."""
    rng = random.Random(seed)
    pairs = [chr(a) + chr(b) for a in range(0x80) for b in range(0x80)]
    return [*pairs, *(near_ascii_text(rng) for _ in range(count))]
