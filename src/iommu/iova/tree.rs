//! The free-range tree of the IOVA allocator: a treap keyed by range start, each node augmented
//! with the largest free range in its subtree, so a top-down fit is found in O(log n).
#![forbid(unsafe_code)]

pub(super) const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
pub(super) struct Node {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) left: u32,
    pub(super) right: u32,
    pub(super) prio: u32,
    /// Largest `end - start` in this subtree.
    pub(super) max: u64,
}

/// Free ranges `[start, end)` in pages: a treap keyed by start, augmented with subtree max.
#[derive(Debug)]
pub(super) struct Tree {
    pub(super) n: Vec<Node>,
    pub(super) spare: Vec<u32>,
    pub(super) root: u32,
    pub(super) rng: u64,
    pub(super) free_pages: u64,
    /// Scratch: the root-to-node path of an in-place update (kept to avoid an allocation).
    path: Vec<u32>,
}

impl Tree {
    pub(super) fn new() -> Self {
        Tree {
            n: Vec::new(),
            spare: Vec::new(),
            root: NIL,
            rng: 0x2545_f491_4f6c_dd1d,
            free_pages: 0,
            path: Vec::new(),
        }
    }

    pub(super) fn maxv(&self, i: u32) -> u64 {
        if i == NIL { 0 } else { self.n[i as usize].max }
    }

    pub(super) fn pull(&mut self, i: u32) {
        let (l, r) = (self.n[i as usize].left, self.n[i as usize].right);
        let own = self.n[i as usize].end - self.n[i as usize].start;
        self.n[i as usize].max = own.max(self.maxv(l)).max(self.maxv(r));
    }

    pub(super) fn split(&mut self, t: u32, key: u64) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.n[t as usize].start < key {
            let (a, b) = self.split(self.n[t as usize].right, key);
            self.n[t as usize].right = a;
            self.pull(t);
            (t, b)
        } else {
            let (a, b) = self.split(self.n[t as usize].left, key);
            self.n[t as usize].left = b;
            self.pull(t);
            (a, t)
        }
    }

    pub(super) fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.n[a as usize].prio > self.n[b as usize].prio {
            let r = self.merge(self.n[a as usize].right, b);
            self.n[a as usize].right = r;
            self.pull(a);
            a
        } else {
            let l = self.merge(a, self.n[b as usize].left);
            self.n[b as usize].left = l;
            self.pull(b);
            b
        }
    }

    pub(super) fn insert(&mut self, start: u64, end: u64) {
        debug_assert!(start < end);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let node = Node { start, end, left: NIL, right: NIL, prio: self.rng as u32, max: end - start };
        let i = match self.spare.pop() {
            Some(i) => {
                self.n[i as usize] = node;
                i
            }
            None => {
                self.n.push(node);
                (self.n.len() - 1) as u32
            }
        };
        let (l, r) = self.split(self.root, start);
        let l = self.merge(l, i);
        self.root = self.merge(l, r);
        self.free_pages += end - start;
    }

    /// Removes the range starting at `start` (which must exist); returns its end.
    pub(super) fn remove(&mut self, start: u64) -> u64 {
        let (l, r) = self.split(self.root, start);
        let (m, r) = self.split(r, start + 1);
        debug_assert!(m != NIL && self.n[m as usize].left == NIL && self.n[m as usize].right == NIL);
        let end = self.n[m as usize].end;
        self.free_pages -= end - start;
        self.spare.push(m);
        self.root = self.merge(l, r);
        end
    }

    /// Changes the range that starts at `start` (which must exist) to `[ns, ne)` in place: one
    /// descent, no split or merge. The caller guarantees that no other range lies between the
    /// old and the new start, so the key order stays valid; the subtree maxima along the path are
    /// recomputed bottom-up.
    fn set_range(&mut self, start: u64, ns: u64, ne: u64) {
        debug_assert!(ns < ne);
        self.path.clear();
        let mut t = self.root;
        while t != NIL {
            self.path.push(t);
            let n = &self.n[t as usize];
            t = match start.cmp(&n.start) {
                core::cmp::Ordering::Less => n.left,
                core::cmp::Ordering::Greater => n.right,
                core::cmp::Ordering::Equal => break,
            };
        }
        let i = *self.path.last().expect("the range exists") as usize;
        debug_assert_eq!(self.n[i].start, start);
        self.free_pages = self.free_pages - (self.n[i].end - self.n[i].start) + (ne - ns);
        self.n[i].start = ns;
        self.n[i].end = ne;
        for k in (0..self.path.len()).rev() {
            let j = self.path[k];
            self.pull(j);
        }
    }

    /// The free range with the largest start `<= key`.
    pub(super) fn floor(&self, key: u64) -> Option<(u64, u64)> {
        let (mut t, mut best) = (self.root, None);
        while t != NIL {
            let n = &self.n[t as usize];
            if n.start <= key {
                best = Some((n.start, n.end));
                t = n.right;
            } else {
                t = n.left;
            }
        }
        best
    }

    /// The free range with the smallest start `>= key`.
    pub(super) fn ceil(&self, key: u64) -> Option<(u64, u64)> {
        let (mut t, mut best) = (self.root, None);
        while t != NIL {
            let n = &self.n[t as usize];
            if n.start >= key {
                best = Some((n.start, n.end));
                t = n.left;
            } else {
                t = n.right;
            }
        }
        best
    }

    /// Highest aligned block of `need` pages ending at or below `limit`: (range start, range
    /// end, block).
    pub(super) fn find(&self, t: u32, need: u64, align: u64, limit: u64) -> Option<(u64, u64, u64)> {
        if t == NIL || self.n[t as usize].max < need {
            return None;
        }
        let n = self.n[t as usize];
        if n.start < limit {
            if let Some(x) = self.find(n.right, need, align, limit) {
                return Some(x);
            }
            let hi = n.end.min(limit);
            if hi >= n.start + need {
                let a = (hi - need) & !(align - 1);
                if a >= n.start {
                    return Some((n.start, n.end, a));
                }
            }
        }
        self.find(n.left, need, align, limit)
    }

    pub(super) fn alloc(&mut self, need: u64, align: u64, limit: u64) -> Option<u64> {
        let (s, e, a) = self.find(self.root, need, align, limit)?;
        match (a > s, a + need < e) {
            (false, false) => {
                self.remove(s);
            }
            // Top-down allocation carves the top of a range: it shrinks in place.
            (true, false) => self.set_range(s, s, a),
            (false, true) => self.set_range(s, a + need, e),
            (true, true) => {
                self.set_range(s, s, a);
                self.insert(a + need, e);
            }
        }
        Some(a)
    }

    /// Returns `[pfn, pfn + pages)` to the free set, merging with its neighbours. `false` if any
    /// part of it is already free (nothing changes then).
    pub(super) fn free(&mut self, pfn: u64, pages: u64) -> bool {
        let end = pfn + pages;
        let below = self.floor(pfn);
        let above = self.ceil(pfn);
        if below.is_some_and(|(_, e)| e > pfn) || above.is_some_and(|(s, _)| s < end) {
            return false;
        }
        // Merging with a neighbour changes that range in place.
        match (below.filter(|&(_, be)| be == pfn), above.filter(|&(s, _)| s == end)) {
            (Some((bs, _)), Some((as_, _))) => {
                let ae = self.remove(as_);
                self.set_range(bs, bs, ae);
            }
            (Some((bs, _)), None) => self.set_range(bs, bs, end),
            (None, Some((as_, ae))) => self.set_range(as_, pfn, ae),
            (None, None) => self.insert(pfn, end),
        }
        true
    }

    /// Takes `[pfn, pfn + pages)` out of the free set if it is wholly free.
    pub(super) fn reserve(&mut self, pfn: u64, pages: u64) -> bool {
        match self.floor(pfn) {
            Some((s, e)) if e >= pfn + pages => {
                self.remove(s);
                if s < pfn {
                    self.insert(s, pfn);
                }
                if pfn + pages < e {
                    self.insert(pfn + pages, e);
                }
                true
            }
            _ => false,
        }
    }

    pub(super) fn ranges(&self, t: u32, out: &mut Vec<(u64, u64)>) {
        if t != NIL {
            let n = self.n[t as usize];
            self.ranges(n.left, out);
            out.push((n.start, n.end));
            self.ranges(n.right, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_finds_the_highest_aligned_fit() {
        let mut t = Tree::new();
        t.insert(10, 20);
        t.insert(30, 37);
        t.insert(100, 101);
        assert_eq!(t.alloc(4, 4, 1000), Some(32));
        assert_eq!(t.alloc(4, 4, 1000), Some(16));
        assert_eq!(t.alloc(4, 4, 1000), Some(12));
        assert_eq!(t.alloc(4, 4, 1000), None);
        assert_eq!(t.alloc(1, 1, 100), Some(36));
        assert!(t.free(32, 4));
        assert!(!t.free(33, 1));
        assert_eq!(t.floor(35), Some((30, 36)));
    }
}
