//! The built-in benchmark: seeded instruction-following samples from ten task families whose
//! answers are exact functions of the prompt, with a difficulty knob per family (`level`: number
//! of words or items, digits, facts asked, sentences). It mirrors the paper's evaluation split:
//! train, dev and an in-distribution test set share instruction phrasings and levels; `test_long`
//! uses levels above those seen in training; `test_phrasing` uses phrasings never seen in training.
//! Two families ask about a fixed invented fact table the teacher has to memorise; `describe`
//! answers are several sentences, so partially right answers get partial ROUGE-L credit.
//!
//! Everything random comes from `ChaCha8Rng` seeded with the user's seed (the fact table from a
//! constant seed), and no hash-map order reaches the output: the same seed gives the same files.

use super::format::write_dolly_jsonl;
use super::{Sample, Template};
use anyhow::{anyhow, Context, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::path::Path;

/// The task families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Copy,
    Uppercase,
    Reverse,
    Sort,
    Count,
    Arithmetic,
    Spell,
    Acronym,
    Fact,
    Describe,
}

impl Family {
    pub const ALL: [Family; 10] = [
        Family::Copy,
        Family::Uppercase,
        Family::Reverse,
        Family::Sort,
        Family::Count,
        Family::Arithmetic,
        Family::Spell,
        Family::Acronym,
        Family::Fact,
        Family::Describe,
    ];

    /// The name written to the `category` field.
    pub fn name(self) -> &'static str {
        match self {
            Family::Copy => "copy",
            Family::Uppercase => "uppercase",
            Family::Reverse => "reverse",
            Family::Sort => "sort",
            Family::Count => "count",
            Family::Arithmetic => "arithmetic",
            Family::Spell => "spell",
            Family::Acronym => "acronym",
            Family::Fact => "fact",
            Family::Describe => "describe",
        }
    }

    /// Difficulty levels of train, dev and the in-distribution and phrasing test sets.
    pub fn train_levels(self) -> RangeInclusive<usize> {
        match self {
            Family::Copy | Family::Uppercase | Family::Reverse | Family::Acronym | Family::Sort => {
                2..=6
            }
            Family::Count => 1..=8,
            Family::Arithmetic | Family::Spell => 1..=3,
            Family::Fact => 1..=2,
            Family::Describe => 2..=3,
        }
    }

    /// Harder levels, seen only in `test_long`.
    pub fn long_levels(self) -> RangeInclusive<usize> {
        match self {
            Family::Copy | Family::Uppercase | Family::Reverse | Family::Acronym | Family::Sort => {
                9..=12
            }
            Family::Count => 11..=15,
            Family::Arithmetic => 4..=5,
            Family::Spell => 4..=6,
            Family::Fact => 3..=4,
            Family::Describe => 4..=5,
        }
    }

    /// Instruction phrasings: (seen in training, held out for `test_phrasing`). `{N}`, `{A}`
    /// and `{S}` are filled in by the fact families.
    fn phrasings(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Family::Copy => (
                &[
                    "Repeat the words exactly.",
                    "Copy the following words.",
                    "Write the same words again.",
                ],
                &["Echo these words back without any change."],
            ),
            Family::Uppercase => (
                &[
                    "Write the words in capital letters.",
                    "Convert the words to upper case.",
                    "Change every word to uppercase.",
                ],
                &["Make all of these letters big."],
            ),
            Family::Reverse => (
                &[
                    "Reverse the order of the words.",
                    "List the words from last to first.",
                    "Write the words in reverse order.",
                ],
                &["Read these words backwards, starting with the final one."],
            ),
            Family::Sort => (
                &[
                    "Sort the numbers from smallest to largest.",
                    "Put the numbers in increasing order.",
                    "Arrange the numbers in ascending order.",
                ],
                &["Order these values so that the lowest comes first."],
            ),
            Family::Count => (
                &[
                    "How many words are in the text?",
                    "Count the words.",
                    "Tell me the number of words.",
                ],
                &["What is the word count of this text?"],
            ),
            Family::Arithmetic => (
                &[
                    "Compute the result.",
                    "Work out the answer.",
                    "Calculate the value.",
                ],
                &["Evaluate this expression from left to right."],
            ),
            Family::Spell => (
                &[
                    "Write the number in words.",
                    "Spell out the number.",
                    "Write this number using English words.",
                ],
                &["Express this figure with words instead of digits."],
            ),
            Family::Acronym => (
                &[
                    "Write the first letter of each word.",
                    "Give the initials of the words.",
                    "Take the first letter of every word.",
                ],
                &["Form an acronym from these words."],
            ),
            Family::Fact => (
                &[
                    "What is the {A} of {N}?",
                    "Tell me the {A} of {N}.",
                    "State the {A} of {N}.",
                ],
                &["I would like to know {N}'s {A}."],
            ),
            Family::Describe => (
                &[
                    "Describe {N} in {S} sentences.",
                    "Write {S} sentences about {N}.",
                    "Tell me {S} facts about {N}.",
                ],
                &["Give a short profile of {N} using {S} sentences."],
            ),
        }
    }
}

/// Which phrasings a sample may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phrasing {
    Seen,
    Unseen,
}

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "green", "table", "music", "horse", "light", "paper",
    "tiger", "bread", "chair", "ocean", "plant", "smile", "train", "water", "house", "dream",
    "night", "sugar", "field", "glass", "queen", "snake", "money", "pilot", "juice", "lemon",
    "sun", "cat", "dog", "box", "red", "cup", "hat", "pen", "map", "egg", "bird", "fish", "tree",
    "door", "book", "milk", "road", "ship", "star", "wind", "moon", "rain", "salt", "king", "ring",
    "rock", "song", "gold", "leaf", "bell",
];

/// The invented fact table: every person has five attributes.
pub struct Person {
    pub name: String,
    pub home: String,
    pub color: &'static str,
    pub food: &'static str,
    pub pet: &'static str,
    pub number: u32,
}

/// Attribute nouns as asked in questions, in the fixed order of descriptions.
const ATTRIBUTES: [&str; 5] = [
    "home town",
    "favourite color",
    "favourite food",
    "pet",
    "lucky number",
];

impl Person {
    /// The sentence stating attribute `a` (an index into [`ATTRIBUTES`]).
    fn sentence(&self, a: usize) -> String {
        let n = &self.name;
        match a {
            0 => format!("{n} lives in {}.", self.home),
            1 => format!("{n} likes the color {}.", self.color),
            2 => format!("{n} likes to eat {}.", self.food),
            3 => format!("{n} has a pet {}.", self.pet),
            _ => format!("The lucky number of {n} is {}.", self.number),
        }
    }
}

/// The fixed fact table (24 people), the same for every seed.
pub fn fact_table() -> Vec<Person> {
    const SYL: &[&str] = &[
        "zor", "van", "kel", "mit", "pra", "doa", "lun", "rik", "sa", "bel", "tor", "nim", "qua",
        "fen", "dra", "lo",
    ];
    const TOWN: &[&str] = &[
        "Ardel",
        "Brimm",
        "Cosk",
        "Dunvale",
        "Elmra",
        "Fosk",
        "Gant",
        "Hollow Bay",
    ];
    const COLORS: &[&str] = &[
        "red", "blue", "green", "teal", "orange", "purple", "yellow", "gray", "pink", "brown",
    ];
    const FOODS: &[&str] = &[
        "plums", "rice", "bread", "cheese", "soup", "apples", "beans", "noodles", "pears", "fish",
    ];
    const PETS: &[&str] = &[
        "cat", "dog", "owl", "goat", "fox", "horse", "frog", "crow", "bee", "seal",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(0xFAC7);
    let mut names = HashSet::new();
    let mut people = Vec::new();
    while people.len() < 24 {
        let raw = format!(
            "{}{}",
            SYL.choose(&mut rng).unwrap(),
            SYL.choose(&mut rng).unwrap()
        );
        let name = raw[..1].to_uppercase() + &raw[1..];
        if !names.insert(name.clone()) {
            continue;
        }
        people.push(Person {
            name,
            home: TOWN.choose(&mut rng).unwrap().to_string(),
            color: COLORS.choose(&mut rng).unwrap(),
            food: FOODS.choose(&mut rng).unwrap(),
            pet: PETS.choose(&mut rng).unwrap(),
            number: rng.random_range(1..100),
        });
    }
    people
}

/// English words for 0 <= n < 1,000,000 ("three hundred forty-seven").
pub fn number_words(n: u64) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    fn below_1000(n: u64) -> String {
        let mut parts = Vec::new();
        if n >= 100 {
            parts.push(format!("{} hundred", ONES[(n / 100) as usize]));
        }
        let r = n % 100;
        if r > 0 || n == 0 {
            parts.push(if r < 20 {
                ONES[r as usize].to_string()
            } else if r.is_multiple_of(10) {
                TENS[(r / 10) as usize].to_string()
            } else {
                format!("{}-{}", TENS[(r / 10) as usize], ONES[(r % 10) as usize])
            });
        }
        parts.join(" ")
    }
    assert!(n < 1_000_000, "number_words supports n < 1e6");
    if n < 1000 {
        return below_1000(n);
    }
    let (th, rest) = (n / 1000, n % 1000);
    if rest == 0 {
        format!("{} thousand", below_1000(th))
    } else {
        format!("{} thousand {}", below_1000(th), below_1000(rest))
    }
}

fn words(rng: &mut ChaCha8Rng, k: usize) -> Vec<&'static str> {
    (0..k).map(|_| *WORDS.choose(rng).unwrap()).collect()
}

/// A number with exactly `digits` digits (0..=9 for one digit).
fn with_digits(rng: &mut ChaCha8Rng, digits: usize) -> u64 {
    if digits <= 1 {
        return rng.random_range(0..10);
    }
    let lo = 10u64.pow(digits as u32 - 1);
    rng.random_range(lo..lo * 10)
}

/// One sample of `family` at difficulty `level` (id 0; the caller numbers them).
pub fn make_sample(
    family: Family,
    level: usize,
    phrasing: Phrasing,
    facts: &[Person],
    rng: &mut ChaCha8Rng,
) -> Sample {
    let (seen, unseen) = family.phrasings();
    let pool = if phrasing == Phrasing::Seen {
        seen
    } else {
        unseen
    };
    let mut instruction = pool.choose(rng).unwrap().to_string();
    let (input, response) = match family {
        Family::Copy => {
            let w = words(rng, level).join(" ");
            (w.clone(), w)
        }
        Family::Uppercase => {
            let w = words(rng, level).join(" ");
            (w.clone(), w.to_uppercase())
        }
        Family::Reverse => {
            let mut w = words(rng, level);
            let input = w.join(" ");
            w.reverse();
            (input, w.join(" "))
        }
        Family::Sort => {
            let mut v: Vec<u32> = (0..level).map(|_| rng.random_range(0..100)).collect();
            let input = join_nums(&v);
            v.sort_unstable();
            (input, join_nums(&v))
        }
        Family::Count => {
            let w = words(rng, level).join(" ");
            (
                w,
                format!("{level} {}", if level == 1 { "word" } else { "words" }),
            )
        }
        Family::Arithmetic => {
            // `level` = digits per operand; harder levels also take more steps.
            let operands = 2 + rng.random_range(0..=1) + usize::from(level > 3);
            let mut total = with_digits(rng, level) as i64;
            let mut expr = total.to_string();
            for _ in 1..operands {
                let x = with_digits(rng, level) as i64;
                // Subtract only when the result stays non-negative, so answers are plain digits.
                if x <= total && rng.random_bool(0.5) {
                    total -= x;
                    expr += &format!(" - {x}");
                } else {
                    total += x;
                    expr += &format!(" + {x}");
                }
            }
            (expr.clone(), format!("{expr} = {total}"))
        }
        Family::Spell => {
            let n = with_digits(rng, level);
            (n.to_string(), number_words(n))
        }
        Family::Acronym => {
            let w = words(rng, level);
            let initials: Vec<String> = w.iter().map(|x| x[..1].to_string()).collect();
            (w.join(" "), initials.join(" "))
        }
        Family::Fact => {
            let p = facts.choose(rng).unwrap();
            let mut attrs: Vec<usize> = (0..ATTRIBUTES.len()).collect();
            attrs.shuffle(rng);
            attrs.truncate(level.min(ATTRIBUTES.len()));
            let names: Vec<&str> = attrs.iter().map(|&a| ATTRIBUTES[a]).collect();
            instruction = instruction
                .replace("{N}", &p.name)
                .replace("{A}", &english_list(&names));
            let answer: Vec<String> = attrs.iter().map(|&a| p.sentence(a)).collect();
            (String::new(), answer.join(" "))
        }
        Family::Describe => {
            let p = facts.choose(rng).unwrap();
            let s = level.min(ATTRIBUTES.len());
            instruction = instruction
                .replace("{N}", &p.name)
                .replace("{S}", &number_words(s as u64));
            let answer: Vec<String> = (0..s).map(|a| p.sentence(a)).collect();
            (String::new(), answer.join(" "))
        }
    };
    let mut s = Sample::new(0, instruction, input, response);
    s.category = family.name().to_string();
    s
}

fn join_nums(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

/// "a", "a and b", "a, b and c".
fn english_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Sizes and seed of a generated benchmark.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub seed: u64,
    pub n_train: usize,
    pub n_dev: usize,
    /// Size of each of the three test sets.
    pub n_test: usize,
    /// Target vocabulary size of the trained BPE tokenizer.
    pub vocab_size: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 10,
            n_train: 4000,
            n_dev: 200,
            n_test: 200,
            vocab_size: 1024,
        }
    }
}

/// The generated splits.
pub struct SynthData {
    pub train: Vec<Sample>,
    pub dev: Vec<Sample>,
    /// In-distribution: seen phrasings and levels, prompts not in train.
    pub test_id: Vec<Sample>,
    /// Longer inputs / more steps than any training sample.
    pub test_long: Vec<Sample>,
    /// Instruction phrasings never seen in training.
    pub test_phrasing: Vec<Sample>,
}

impl SynthData {
    /// (file stem, samples) of every split, in the order they are written.
    pub fn splits(&self) -> [(&'static str, &[Sample]); 5] {
        [
            ("train", &self.train),
            ("dev", &self.dev),
            ("test_id", &self.test_id),
            ("test_long", &self.test_long),
            ("test_phrasing", &self.test_phrasing),
        ]
    }
}

/// Generates all splits. Families are used in turn (round robin from a seeded start, so every
/// split is balanced); a prompt already present in any split is drawn again, so the splits are
/// disjoint. The held-out sets are drawn first so that the large train set cannot exhaust the
/// small prompt spaces (e.g. descriptions) they need.
pub fn generate(cfg: &SynthConfig) -> Result<SynthData> {
    let facts = fact_table();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut seen = HashSet::new();
    let mut split = |n: usize,
                     long: bool,
                     phrasing: Phrasing,
                     rng: &mut ChaCha8Rng|
     -> Result<Vec<Sample>> {
        let mut out = Vec::with_capacity(n);
        let start = rng.random_range(0..Family::ALL.len());
        let mut misses = 0usize;
        let mut i = 0usize;
        while out.len() < n {
            let family = Family::ALL[(start + i) % Family::ALL.len()];
            let levels = if long {
                family.long_levels()
            } else {
                family.train_levels()
            };
            let level = rng.random_range(levels);
            let s = make_sample(family, level, phrasing, &facts, rng);
            if seen.insert((s.instruction.clone(), s.input.clone())) {
                out.push(s);
                i += 1;
                misses = 0;
            } else {
                misses += 1;
                // A family whose prompt space is used up yields its turn to the next one.
                if misses > 200 {
                    i += 1;
                }
                if misses > 200 * Family::ALL.len() {
                    return Err(anyhow!("cannot draw {n} distinct samples: the benchmark's prompt space is exhausted"));
                }
            }
        }
        Ok(out)
    };
    let dev = split(cfg.n_dev, false, Phrasing::Seen, &mut rng)?;
    let test_id = split(cfg.n_test, false, Phrasing::Seen, &mut rng)?;
    let test_long = split(cfg.n_test, true, Phrasing::Seen, &mut rng)?;
    let test_phrasing = split(cfg.n_test, false, Phrasing::Unseen, &mut rng)?;
    let train = split(cfg.n_train, false, Phrasing::Seen, &mut rng)?;
    let mut data = SynthData {
        train,
        dev,
        test_id,
        test_long,
        test_phrasing,
    };
    // Ids are 1-based line numbers, as when the files are read back.
    for part in [
        &mut data.train,
        &mut data.dev,
        &mut data.test_id,
        &mut data.test_long,
        &mut data.test_phrasing,
    ] {
        for (i, s) in part.iter_mut().enumerate() {
            s.id = i as u64 + 1;
        }
    }
    Ok(data)
}

/// Trains a GPT-2-style byte-level BPE tokenizer (no prefix space, `<|endoftext|>` as EOS and
/// pad, id 0) on the given texts. Deterministic: the trainer breaks ties by token ids.
pub fn train_tokenizer<S: AsRef<str> + Send>(
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder, TokenizerImpl,
    };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::default()
        .add_prefix_space(false)
        .trim_offsets(false);
    let mut tk: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_post_processor(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()))
        .build()
        .map_err(|e| anyhow!("tokenizer: {e}"))?;
    tk.train(&mut trainer, texts)
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    Ok(tk.into())
}

/// The EOS (and pad) token of the benchmark tokenizer.
pub const EOS: &str = "<|endoftext|>";

/// What `write_benchmark` produced.
pub struct SynthSummary {
    pub files: Vec<(String, usize)>,
    pub vocab_size: usize,
}

/// Generates the benchmark and writes `DIR/{train,dev,test_id,test_long,test_phrasing}.jsonl`
/// (Dolly format), `DIR/tokenizer.json` trained on the training split rendered with both
/// templates, and `DIR/facts.json` (the fact table, for reference).
pub fn write_benchmark(dir: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    crate::create_dir_all(dir)?;
    let data = generate(cfg)?;
    let mut files = Vec::new();
    for (name, samples) in data.splits() {
        let path = dir.join(format!("{name}.jsonl"));
        write_dolly_jsonl(&path, samples).with_context(|| format!("writing {}", path.display()))?;
        files.push((format!("{name}.jsonl"), samples.len()));
    }
    // The tokenizer sees what training will feed the models: prompts in both templates + answers.
    let texts = data.train.iter().flat_map(|s| {
        [Template::Alpaca, Template::Plain].map(|t| format!("{}{}", t.prompt(s), s.response))
    });
    let tok = train_tokenizer(texts, cfg.vocab_size)?;
    let vocab_size = tok.get_vocab_size(true);
    let tok = crate::tokenizer::Tokenizer::from_inner(tok, None);
    tok.save(&dir.join("tokenizer.json"))?;
    let facts: Vec<serde_json::Value> = fact_table()
        .iter()
        .map(|p| {
            serde_json::json!({"name": p.name, "home": p.home, "color": p.color, "food": p.food, "pet": p.pet, "number": p.number})
        })
        .collect();
    crate::write_atomic(
        &dir.join("facts.json"),
        serde_json::to_string_pretty(&facts)?.as_bytes(),
    )?;
    files.push(("tokenizer.json".into(), vocab_size));
    Ok(SynthSummary { files, vocab_size })
}
