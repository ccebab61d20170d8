//! CPython's `random` module (Mersenne Twister MT19937, `Modules/_randommodule.c` and
//! `Lib/random.py` of Python 3.11), call for call: RULER's generators draw every needle,
//! depth and word from it, so its official samples are reproduced only by the same stream.
//! Covered: `seed(int)`, `getrandbits`, `_randbelow`, `randint`, `choice`, `sample`,
//! `shuffle`, `random`, `choices` (no weights) and `uuid.UUID(int=getrandbits(128),
//! version=4)`; numpy's legacy `seed`/`randint`, which RULER's variable tracking uses; and
//! numpy's `default_rng(seed).permutation(n)` (PCG64 seeded through `SeedSequence`), which HF
//! datasets' `shuffle(seed=…)` draws and HELMET selects its test items and demonstrations with.

const N: usize = 624;
const M: usize = 397;

/// `random.Random`, seeded as `random.seed(n)` seeds it.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed (`init_by_array` over the
    /// seed's 32-bit words, least significant first).
    pub fn new(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut r = Self {
            mt: [0; N],
            index: N,
        };
        r.init_by_array(&key);
        r
    }

    /// `numpy.random.seed(seed)`: numpy's legacy `RandomState` (the same Mersenne Twister,
    /// seeded by `init_genrand` directly).
    pub fn numpy_legacy(seed: u32) -> Self {
        let mut r = Self {
            mt: [0; N],
            index: N,
        };
        r.init_genrand(seed);
        r
    }

    /// `numpy.random.randint(low, high)` of the legacy generator (high excluded): masked
    /// rejection sampling on 32-bit draws.
    pub fn numpy_randint(&mut self, low: i64, high: i64) -> i64 {
        let rng = (high - low - 1) as u32;
        if rng == 0 {
            return low;
        }
        let mask = u32::MAX >> rng.leading_zeros();
        loop {
            let v = self.next_u32() & mask;
            if v <= rng {
                return low + v as i64;
            }
        }
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1812433253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19650218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1664525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1566083941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    fn generate(&mut self) {
        let mag = |y: u32| if y & 1 == 1 { 0x9908_b0df } else { 0 };
        for k in 0..N {
            let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % N] & 0x7fff_ffff);
            self.mt[k] = self.mt[(k + M) % N] ^ (y >> 1) ^ mag(y);
        }
        self.index = 0;
    }

    /// `genrand_uint32`.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.generate();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for 1 ≤ k ≤ 128: 32-bit words, least significant first, the last
    /// one shifted down to its remaining bits.
    pub fn getrandbits(&mut self, k: u32) -> u128 {
        assert!((1..=128).contains(&k), "getrandbits({k})");
        let mut out = 0u128;
        let mut left = k;
        let mut shift = 0;
        while left > 0 {
            let mut r = self.next_u32();
            if left < 32 {
                r >>= 32 - left;
            }
            out |= (r as u128) << shift;
            shift += 32;
            left = left.saturating_sub(32);
        }
        out
    }

    /// `_randbelow(n)`: rejection sampling over `n.bit_length()` bits.
    pub fn randbelow(&mut self, n: usize) -> usize {
        assert!(n > 0, "randbelow(0)");
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `randint(a, b)`, both ends included.
    pub fn randint(&mut self, a: i64, b: i64) -> i64 {
        a + self.randbelow((b - a + 1) as usize) as i64
    }

    /// `choice(seq)`.
    pub fn choice<'t, T>(&mut self, seq: &'t [T]) -> &'t T {
        &seq[self.randbelow(seq.len())]
    }

    /// `shuffle(x)`.
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i + 1);
            x.swap(i, j);
        }
    }

    /// `sample(range(n), k)`: indices, in the order drawn (a pool for small populations, a
    /// set of selected indices for large ones, as CPython switches between them).
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample larger than population");
        let mut setsize = 21usize;
        if k > 5 {
            let e = ((k as f64 * 3.0).ln() / 4f64.ln()).ceil() as u32;
            setsize += 4usize.pow(e);
        }
        let mut result = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow(n - i);
                result.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n);
                while !selected.insert(j) {
                    j = self.randbelow(n);
                }
                result.push(j);
            }
        }
        result
    }

    /// `sample(population, k)`.
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Vec<T> {
        self.sample_indices(population.len(), k)
            .into_iter()
            .map(|i| population[i].clone())
            .collect()
    }

    /// `random()`: 53 bits in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)
    }

    /// `choices(population, k=k)` without weights.
    pub fn choices<T: Clone>(&mut self, population: &[T], k: usize) -> Vec<T> {
        let n = population.len() as f64;
        (0..k)
            .map(|_| population[(self.random() * n).floor() as usize].clone())
            .collect()
    }

    /// `str(uuid.UUID(int=random.getrandbits(128), version=4))`.
    pub fn uuid4(&mut self) -> String {
        let mut v = self.getrandbits(128);
        v &= !(0xc000u128 << 48);
        v |= 0x8000u128 << 48;
        v &= !(0xf000u128 << 64);
        v |= 4u128 << 76;
        let h = format!("{v:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

/// numpy's `Generator(PCG64(seed))` (`np.random.default_rng(seed)`), as far as
/// `permutation(n)` draws from it: the 128-bit LCG with the XSL-RR output, seeded from
/// `SeedSequence(seed).generate_state(4, uint64)`, 32-bit draws taken from halves of a 64-bit
/// one (`pcg64_next32`), bounded by masked rejection (`random_interval`).
#[derive(Clone)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    /// The high half of the last 64-bit draw, not yet used.
    spare: Option<u32>,
}

impl Pcg64 {
    const MULT: u128 = (2549297995355413924u128 << 64) | 4865540595714422341;

    /// `np.random.default_rng(seed)` for a non-negative integer seed.
    pub fn new(seed: u128) -> Self {
        let s = seed_sequence_state(seed);
        let init = ((s[0] as u128) << 64) | s[1] as u128;
        let seq = ((s[2] as u128) << 64) | s[3] as u128;
        let mut r = Self {
            state: 0,
            inc: (seq << 1) | 1,
            spare: None,
        };
        r.step();
        r.state = r.state.wrapping_add(init);
        r.step();
        r
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(Self::MULT).wrapping_add(self.inc);
    }

    /// `random_raw()`: one 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let v = ((self.state >> 64) as u64) ^ (self.state as u64);
        v.rotate_right((self.state >> 122) as u32)
    }

    fn next_u32(&mut self) -> u32 {
        if let Some(h) = self.spare.take() {
            return h;
        }
        let n = self.next_u64();
        self.spare = Some((n >> 32) as u32);
        n as u32
    }

    /// A uniform integer in `0..=max` (`random_interval`).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let v = if max <= u32::MAX as u64 {
                (self.next_u32() as u64) & mask
            } else {
                self.next_u64() & mask
            };
            if v <= max {
                return v;
            }
        }
    }

    /// `permutation(n)`: `arange(n)` shuffled by Fisher-Yates from the end.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut a: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u64) as usize;
            a.swap(i, j);
        }
        a
    }
}

/// `SeedSequence(seed).generate_state(4, np.uint64)`: the seed's 32-bit words (least
/// significant first) hashed into a pool of four, the pool mixed, four 64-bit words drawn.
fn seed_sequence_state(seed: u128) -> [u64; 4] {
    const INIT_A: u32 = 0x43b0d7e5;
    const MULT_A: u32 = 0x931e8875;
    const INIT_B: u32 = 0x8b51f9dd;
    const MULT_B: u32 = 0x58f38ded;
    const MIX_L: u32 = 0xca01f9dd;
    const MIX_R: u32 = 0x4973f715;
    let mut entropy = vec![seed as u32];
    let mut rest = seed >> 32;
    while rest != 0 {
        entropy.push(rest as u32);
        rest >>= 32;
    }
    let mut hash_const = INIT_A;
    let mut hashmix = |v: u32| {
        let mut v = v ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        v = v.wrapping_mul(hash_const);
        v ^ (v >> 16)
    };
    let mix = |x: u32, y: u32| {
        let r = MIX_L.wrapping_mul(x).wrapping_sub(MIX_R.wrapping_mul(y));
        r ^ (r >> 16)
    };
    let mut pool = [0u32; 4];
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(entropy.get(i).copied().unwrap_or(0));
    }
    for src in 0..4 {
        for dst in 0..4 {
            if src != dst {
                let h = hashmix(pool[src]);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &e in entropy.iter().skip(4) {
        for p in pool.iter_mut() {
            *p = mix(*p, hashmix(e));
        }
    }
    let mut h = INIT_B;
    let mut words = [0u32; 8];
    for (i, w) in words.iter_mut().enumerate() {
        let mut v = pool[i % 4] ^ h;
        h = h.wrapping_mul(MULT_B);
        v = v.wrapping_mul(h);
        *w = v ^ (v >> 16);
    }
    std::array::from_fn(|i| words[2 * i] as u64 | (words[2 * i + 1] as u64) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values printed by CPython 3.11.7 (the commands are beside each).

    #[test]
    fn random_and_getrandbits_match_cpython() {
        // python3 -c "import random; random.seed(42); print(random.random(), random.getrandbits(32), random.getrandbits(7), random.getrandbits(70))"
        let mut r = PyRandom::new(42);
        assert_eq!(r.random(), 0.6394267984578837);
        assert_eq!(r.getrandbits(32), GETRANDBITS_32);
        assert_eq!(r.getrandbits(7), GETRANDBITS_7);
        assert_eq!(r.getrandbits(70), GETRANDBITS_70);
    }

    #[test]
    fn randint_choice_shuffle_sample_match_cpython() {
        // python3 -c "import random; random.seed(42); print([random.randint(1000000, 9999999) for _ in range(3)]); print(random.choice(list(range(1000)))); x=list(range(10)); random.shuffle(x); print(x); print(random.sample(range(30), 4)); print(random.sample(range(100000), 8))"
        let mut r = PyRandom::new(42);
        let ints: Vec<i64> = (0..3).map(|_| r.randint(1000000, 9999999)).collect();
        assert_eq!(ints, RANDINTS);
        let seq: Vec<usize> = (0..1000).collect();
        assert_eq!(*r.choice(&seq), CHOICE);
        let mut x: Vec<usize> = (0..10).collect();
        r.shuffle(&mut x);
        assert_eq!(x, SHUFFLED);
        assert_eq!(r.sample_indices(30, 4), SAMPLE_POOL);
        assert_eq!(r.sample_indices(100000, 8), SAMPLE_SET);
    }

    #[test]
    fn uuid_choices_and_large_seeds_match_cpython() {
        // python3 -c "import random, uuid; random.seed(7); print(uuid.UUID(int=random.getrandbits(128), version=4)); print(''.join(random.choices('ABCDEFGHIJKLMNOPQRSTUVWXYZ', k=5))); random.seed(2**40+3); print(random.getrandbits(32))"
        let mut r = PyRandom::new(7);
        assert_eq!(r.uuid4(), UUID_SEED7);
        let letters: Vec<char> = ('A'..='Z').collect();
        let s: String = r.choices(&letters, 5).into_iter().collect();
        assert_eq!(s, CHOICES_SEED7);
        assert_eq!(
            PyRandom::new((1 << 40) + 3).getrandbits(32),
            GETRANDBITS_BIG_SEED
        );
    }

    #[test]
    fn numpy_legacy_randint_matches_numpy() {
        // python3 -c "import numpy as np; np.random.seed(42); print([int(np.random.randint(10000, 99999)) for _ in range(5)])"  (numpy 2.4.6)
        let mut r = PyRandom::numpy_legacy(42);
        let v: Vec<i64> = (0..5).map(|_| r.numpy_randint(10000, 99999)).collect();
        assert_eq!(v, [25795, 10860, 86820, 64886, 16265]);
    }

    #[test]
    fn numpy_default_rng_permutation_matches_numpy() {
        // python3 -c "import numpy as np; print(np.random.PCG64(42).random_raw(3).tolist()); [print(np.random.default_rng(s).permutation(n).tolist()) for s, n in [(42, 20), (2**31-1, 7), (2**40+3, 12), (12345, 300)]]"  (numpy 2.4.6)
        let mut r = Pcg64::new(42);
        let raw: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            raw,
            [
                14276969152011380360,
                8095878257575067585,
                15838336090824644132
            ]
        );
        assert_eq!(
            Pcg64::new(42).permutation(20),
            [15, 9, 14, 7, 12, 10, 6, 19, 3, 0, 16, 5, 11, 18, 2, 4, 17, 1, 13, 8]
        );
        assert_eq!(
            Pcg64::new((1 << 31) - 1).permutation(7),
            [6, 0, 4, 5, 3, 1, 2]
        );
        assert_eq!(
            Pcg64::new((1 << 40) + 3).permutation(12),
            [2, 4, 10, 9, 6, 5, 3, 7, 11, 0, 8, 1]
        );
        assert_eq!(
            Pcg64::new(12345).permutation(300)[..8],
            [92, 293, 226, 200, 258, 23, 160, 186]
        );
        assert_eq!(Pcg64::new(0).permutation(1), [0]);
        assert!(Pcg64::new(0).permutation(0).is_empty());
    }

    const GETRANDBITS_32: u128 = 107420369;
    const GETRANDBITS_7: u128 = 94;
    const GETRANDBITS_70: u128 = 262771874424005612119;
    const RANDINTS: [i64; 3] = [2867825, 1419610, 5614226];
    const CHOICE: usize = 250;
    const SHUFFLED: [usize; 10] = [9, 7, 8, 0, 4, 6, 5, 1, 2, 3];
    const SAMPLE_POOL: [usize; 4] = [1, 0, 2, 6];
    const SAMPLE_SET: [usize; 8] = [30495, 66237, 78907, 3478, 73563, 26062, 93850, 85181];
    const UUID_SEED7: &str = "6513270e-269e-4d37-b2a7-4de452e6b438";
    const CHOICES_SEED7: &str = "QBNJB";
    const GETRANDBITS_BIG_SEED: u128 = 943978446;
}
