//! The engine's per-symbol states: a list in first-seen order, a name index, and the
//! route of the last message.
//!
//! `!markPrice@arr` lists the symbols in the same order message after message, so
//! [`SymbolTable::route`] remembers which slot the update at each position of the last
//! message went to: the next message's update at that position is checked against the
//! slot's name (two word compares for the usual name) and needs no hash lookup; any
//! other order, a new symbol or a removed one takes the index and refreshes the route.
//! The states are visited in list order then, which is also their allocation order.

use super::{le_half, le_word, SymbolMap, SymbolState};

/// Symbol name -> state, with the route of the last message (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct SymbolTable {
    names: Vec<String>,
    /// The names' keys, in the same order (see [`NameKey`]).
    keys: Vec<NameKey>,
    states: Vec<SymbolState>,
    /// name -> slot in `names` and `states`.
    index: SymbolMap<usize>,
    /// Slot of the update at each position of the last message (a hint, checked by name).
    route: Vec<usize>,
}

/// A symbol name as two words, so that the route check compares a name kept inline in
/// a list (no load from the name's own allocation, which is far from everything else)
/// with the name in the message: for 4 to 16 bytes two overlapping loads cover every
/// byte; other lengths compare by length only here and then in full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NameKey {
    len: usize,
    head: u64,
    tail: u64,
}

impl NameKey {
    #[inline]
    fn of(name: &str) -> Self {
        let bytes = name.as_bytes();
        let n = bytes.len();
        let (head, tail) = match n {
            4..=8 => (le_half(bytes, 0), le_half(bytes, n - 4)),
            9..=16 => (le_word(bytes, 0), le_word(bytes, n - 8)),
            _ => (0, 0),
        };
        Self { len: n, head, tail }
    }

    /// Whether the key alone proves the names equal (equal keys of 4 to 16 bytes).
    #[inline]
    fn decides(&self) -> bool {
        (4..=16).contains(&self.len)
    }
}

impl SymbolTable {
    /// The state of `symbol`.
    pub fn get(&self, symbol: &str) -> Option<&SymbolState> {
        let slot = *self.index.get(symbol)?;
        Some(&self.states[slot])
    }

    /// The state of `symbol`, mutable.
    pub fn get_mut(&mut self, symbol: &str) -> Option<&mut SymbolState> {
        let slot = *self.index.get(symbol)?;
        Some(&mut self.states[slot])
    }

    /// Whether `symbol` has a state.
    pub fn contains_key(&self, symbol: &str) -> bool {
        self.index.contains_key(symbol)
    }

    /// Number of symbols with a state.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether no symbol has a state.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Adds or replaces the state of `symbol`.
    pub fn insert(&mut self, symbol: String, state: SymbolState) {
        if let Some(&slot) = self.index.get(symbol.as_str()) {
            self.states[slot] = state;
            return;
        }
        self.index.insert(symbol.clone(), self.states.len());
        self.keys.push(NameKey::of(&symbol));
        self.names.push(symbol);
        self.states.push(state);
    }

    /// The state of `symbol`, created by `make` when there is none.
    pub fn get_or_insert_with(
        &mut self,
        symbol: &str,
        make: impl FnOnce() -> SymbolState,
    ) -> &mut SymbolState {
        let slot = if let Some(&slot) = self.index.get(symbol) {
            slot
        } else {
            self.insert(symbol.to_owned(), make());
            self.states.len() - 1
        };
        &mut self.states[slot]
    }

    /// The slot of the update at `position` of a message, for `symbol`: the route's
    /// slot when its name matches, else the index's (the route is then updated).
    #[inline]
    pub(crate) fn route(&mut self, position: usize, symbol: &str) -> Option<usize> {
        if let Some(&slot) = self.route.get(position) {
            if let Some(key) = self.keys.get(slot) {
                let wanted = NameKey::of(symbol);
                if *key == wanted && (key.decides() || self.names[slot] == symbol) {
                    return Some(slot);
                }
            }
        }
        let slot = *self.index.get(symbol)?;
        if position < self.route.len() {
            self.route[position] = slot;
        } else if position == self.route.len() {
            self.route.push(slot);
        }
        Some(slot)
    }

    /// The state in `slot` (from [`SymbolTable::route`] or [`SymbolTable::slot_of`]).
    #[inline]
    pub(crate) fn slot_mut(&mut self, slot: usize) -> &mut SymbolState {
        &mut self.states[slot]
    }

    /// The slot of `symbol`'s state.
    pub(crate) fn slot_of(&self, symbol: &str) -> Option<usize> {
        self.index.get(symbol).copied()
    }

    /// (name, state) pairs in first-seen order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &SymbolState)> + '_ {
        self.names.iter().zip(self.states.iter())
    }

    /// States in first-seen order.
    pub fn values(&self) -> impl Iterator<Item = &SymbolState> + '_ {
        self.states.iter()
    }

    /// Keeps the states for which `keep` returns `true` (order kept, index rebuilt).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut SymbolState) -> bool) {
        let names = std::mem::take(&mut self.names);
        let states = std::mem::take(&mut self.states);
        self.index.clear();
        self.keys.clear();
        for (name, mut state) in names.into_iter().zip(states) {
            if keep(&name, &mut state) {
                self.insert(name, state);
            }
        }
    }
}

impl std::ops::Index<&str> for SymbolTable {
    type Output = SymbolState;

    fn index(&self, symbol: &str) -> &SymbolState {
        match self.get(symbol) {
            Some(state) => state,
            None => panic!("no state for symbol {symbol}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_keys_decide_like_string_equality_at_every_length() {
        let names = [
            "",
            "A",
            "AB",
            "ABC",
            "ABCD",
            "ABCE",
            "BTCUSDT",
            "BTCUSDC",
            "ETHUSDT",
            "1000SHIBUSDT",
            "1000SHIBUSDC",
            "2000SHIBUSDT",
            "ABCDEFGHIJKLMNOP",
            "ABCDEFGHIJKLMNOQ",
            "BCDEFGHIJKLMNOP",
            "ABCDEFGHIJKLMNOPQ",
            "ABCDEFGHIJKLMNOPR",
            "测试USDT",
            "测试测试USDT",
        ];
        for a in names {
            for b in names {
                let (ka, kb) = (NameKey::of(a), NameKey::of(b));
                let same = ka == kb && (ka.decides() || a == b);
                assert_eq!(same, a == b, "{a} {b}");
            }
        }
    }
}
