//! Decoding fuzz bytes into values. Reads past the end give zeros, so a
//! target never fails on short input; `is_empty` ends operation loops.

pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.bytes(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.u16()) % n
        }
    }

    /// One of `choices` (the first when empty input).
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())]
    }

    /// An offset that is usually interesting: one of `near` plus a small
    /// delta, sometimes a value near 0 or near the top of the type.
    pub fn offset(&mut self, near: &[u64]) -> u64 {
        match self.u8() % 8 {
            0 => u64::MAX - u64::from(self.u8()),
            1 => self.u64(),
            2 => u64::from(self.u8()),
            _ => {
                let base = if near.is_empty() { 0 } else { self.pick(near) };
                base.wrapping_add(u64::from(self.u8() % 64))
            }
        }
    }

    /// An access length: mostly 1, 2, 4 or 8, sometimes 0 to 16.
    pub fn access_len(&mut self) -> usize {
        match self.u8() % 8 {
            0 => usize::from(self.u8() % 17),
            v => [1, 2, 4, 8, 4, 2, 1][usize::from(v - 1)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_reads_as_zeros() {
        let mut input = Input::new(&[1, 2, 3]);
        assert_eq!(input.u16(), 0x0201);
        assert_eq!(input.u32(), 3);
        assert!(input.is_empty());
        assert_eq!(input.u64(), 0);
        assert_eq!(input.pick(&[7, 8]), 7);
        assert_eq!(input.below(0), 0);
    }
}
