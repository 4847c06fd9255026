//! The order in which torch's CPU `sort` and `topk` return equal values.
//!
//! transformers' top-p warper (`torch.sort`) and beam search (`torch.topk`) depend on how ties
//! are ordered, and ties are common with bf16 or fp16 logits. torch's CPU kernels
//! (`aten/src/ATen/native/cpu/SortingKernel.cpp`, `TopKImpl.h`) use the C++ standard library:
//!
//! * `sort` (not stable by default) is `std::sort` over (value, index) pairs, ascending with
//!   NaN last (or descending with NaN first);
//! * `topk(k)` (largest, sorted) over `n` values is `std::partial_sort` when `k * 64 <= n`, else
//!   `std::nth_element` at `k - 1` followed by `std::sort` of the first `k - 1`, with NaN
//!   largest.
//!
//! This module ports libstdc++'s algorithms (introsort with median-of-three and Hoare partition,
//! heap select, insertion sorts; the same since GCC 4.9, and torch's Linux wheels are built with
//! GCC) step for step, so kiln returns ties in exactly torch's CPU order; the ports were checked
//! against torch 2.15 on hundreds of tie-heavy inputs, including inputs that drive introsort
//! into its heapsort fallback. torch's CUDA kernels order ties differently (radix or bitonic
//! sorts); kiln follows the CPU.

/// A value and its original index.
pub type Pair = (f32, usize);

/// `a` before `b` when sorting ascending with NaN last (torch's `KeyValueCompAsc`).
pub fn asc(a: f32, b: f32) -> bool {
    (!a.is_nan() && b.is_nan()) || a < b
}

/// `a` before `b` when taking the largest first with NaN largest (torch's topk comparator).
pub fn desc(a: f32, b: f32) -> bool {
    (a.is_nan() && !b.is_nan()) || a > b
}

const THRESHOLD: usize = 16;

fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

/// libstdc++ `__adjust_heap` (with its `__push_heap`) on `q[..len]`.
fn adjust_heap(
    q: &mut [Pair],
    mut hole: usize,
    len: usize,
    value: Pair,
    comp: fn(f32, f32) -> bool,
) {
    let top = hole;
    let mut second = hole;
    while second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if comp(q[second].0, q[second - 1].0) {
            second -= 1;
        }
        q[hole] = q[second];
        hole = second;
    }
    if len & 1 == 0 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        q[hole] = q[second - 1];
        hole = second - 1;
    }
    while hole > top {
        let parent = (hole - 1) / 2;
        if !comp(q[parent].0, value.0) {
            break;
        }
        q[hole] = q[parent];
        hole = parent;
    }
    q[hole] = value;
}

/// libstdc++ `__make_heap` on the whole slice.
fn make_heap(q: &mut [Pair], comp: fn(f32, f32) -> bool) {
    let n = q.len();
    if n < 2 {
        return;
    }
    let mut parent = (n - 2) / 2;
    loop {
        let v = q[parent];
        adjust_heap(q, parent, n, v, comp);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// libstdc++ `__sort_heap` on the whole slice.
fn sort_heap(q: &mut [Pair], comp: fn(f32, f32) -> bool) {
    let mut last = q.len();
    while last > 1 {
        last -= 1;
        let v = q[last];
        q[last] = q[0];
        adjust_heap(q, 0, last, v, comp);
    }
}

/// libstdc++ `__heap_select(first, first + middle, last)`.
fn heap_select(q: &mut [Pair], middle: usize, comp: fn(f32, f32) -> bool) {
    make_heap(&mut q[..middle], comp);
    for i in middle..q.len() {
        if comp(q[i].0, q[0].0) {
            let v = q[i];
            q[i] = q[0];
            adjust_heap(q, 0, middle, v, comp);
        }
    }
}

/// libstdc++ `__move_median_to_first`.
fn move_median_to_first(
    q: &mut [Pair],
    result: usize,
    a: usize,
    b: usize,
    c: usize,
    comp: fn(f32, f32) -> bool,
) {
    let cmp = |x: usize, y: usize, q: &[Pair]| comp(q[x].0, q[y].0);
    if cmp(a, b, q) {
        if cmp(b, c, q) {
            q.swap(result, b);
        } else if cmp(a, c, q) {
            q.swap(result, c);
        } else {
            q.swap(result, a);
        }
    } else if cmp(a, c, q) {
        q.swap(result, a);
    } else if cmp(b, c, q) {
        q.swap(result, c);
    } else {
        q.swap(result, b);
    }
}

/// libstdc++ `__unguarded_partition_pivot` on `q[first..last]`; returns the cut.
fn partition_pivot(q: &mut [Pair], first: usize, last: usize, comp: fn(f32, f32) -> bool) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(q, first, first + 1, mid, last - 1, comp);
    let pivot = first;
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while comp(q[lo].0, q[pivot].0) {
            lo += 1;
        }
        hi -= 1;
        while comp(q[pivot].0, q[hi].0) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        q.swap(lo, hi);
        lo += 1;
    }
}

/// libstdc++ `__unguarded_linear_insert` of `q[last]`.
fn unguarded_linear_insert(q: &mut [Pair], mut last: usize, comp: fn(f32, f32) -> bool) {
    let v = q[last];
    while comp(v.0, q[last - 1].0) {
        q[last] = q[last - 1];
        last -= 1;
    }
    q[last] = v;
}

/// libstdc++ `__insertion_sort` on `q[first..last]`.
fn insertion_sort(q: &mut [Pair], first: usize, last: usize, comp: fn(f32, f32) -> bool) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        if comp(q[i].0, q[first].0) {
            q[first..=i].rotate_right(1);
        } else {
            unguarded_linear_insert(q, i, comp);
        }
    }
}

fn introsort_loop(
    q: &mut [Pair],
    first: usize,
    mut last: usize,
    mut depth: usize,
    comp: fn(f32, f32) -> bool,
) {
    while last - first > THRESHOLD {
        if depth == 0 {
            // __partial_sort(first, last, last): heap select then heap sort.
            heap_select(&mut q[first..last], last - first, comp);
            sort_heap(&mut q[first..last], comp);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(q, first, last, comp);
        introsort_loop(q, cut, last, depth, comp);
        last = cut;
    }
}

/// `std::sort` of the whole slice.
pub fn std_sort(q: &mut [Pair], comp: fn(f32, f32) -> bool) {
    let n = q.len();
    if n == 0 {
        return;
    }
    introsort_loop(q, 0, n, lg(n) * 2, comp);
    if n > THRESHOLD {
        insertion_sort(q, 0, THRESHOLD, comp);
        for i in THRESHOLD..n {
            unguarded_linear_insert(q, i, comp);
        }
    } else {
        insertion_sort(q, 0, n, comp);
    }
}

/// `std::nth_element(q, q + nth, q + n)`.
fn nth_element(q: &mut [Pair], nth: usize, comp: fn(f32, f32) -> bool) {
    let (mut first, mut last) = (0, q.len());
    if first == last || nth == last {
        return;
    }
    let mut depth = lg(last - first) * 2;
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut q[first..last], nth + 1 - first, comp);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(q, first, last, comp);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(q, first, last, comp);
}

/// `torch.sort(values)` (ascending, CPU): the (value, index) pairs in torch's order.
pub fn sort_ascending(values: &[f32], out: &mut Vec<Pair>) {
    out.clear();
    out.extend(values.iter().enumerate().map(|(i, &v)| (v, i)));
    std_sort(out, asc);
}

/// `torch.topk(values, k)` (largest, sorted, CPU): the indices of the `min(k, n)` largest,
/// best first, ties in torch's order.
pub fn topk(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut q: Vec<Pair> = values.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    if k * 64 <= n {
        heap_select(&mut q, k, desc);
        sort_heap(&mut q[..k], desc);
    } else {
        nth_element(&mut q, k - 1, desc);
        std_sort(&mut q[..k - 1], desc);
    }
    q[..k].iter().map(|&(_, i)| i).collect()
}

/// `torch.topk(values, k)` over a long row that arrives in pieces, without storing it: the
/// `std::partial_sort` branch (`k * 64 <= n`) streamed (`__heap_select` only ever reads the
/// incoming values in index order and compares them with the heap's top). Feed every value in
/// index order with [`push`](Self::push), then call [`finish`](Self::finish). Matches torch
/// only when `k * 64 <= n` for the total `n`; use [`topk`] otherwise.
#[derive(Debug, Clone)]
pub struct StreamingTopK {
    k: usize,
    heap: Vec<Pair>,
    seen: usize,
}

impl StreamingTopK {
    /// An empty selection of the `k` largest.
    pub fn new(k: usize) -> Self {
        StreamingTopK {
            k,
            heap: Vec::with_capacity(k),
            seen: 0,
        }
    }

    /// Offers the next value (its index is the number of values offered before it).
    pub fn push(&mut self, value: f32) {
        let index = self.seen;
        self.seen += 1;
        if self.heap.len() < self.k {
            self.heap.push((value, index));
            if self.heap.len() == self.k {
                make_heap(&mut self.heap, desc);
            }
        } else if self.k > 0 && desc(value, self.heap[0].0) {
            adjust_heap(&mut self.heap, 0, self.k, (value, index), desc);
        }
    }

    /// The (value, index) pairs of the largest values, best first, in torch's order.
    pub fn finish(mut self) -> Vec<Pair> {
        if self.heap.len() < self.k {
            // Fewer values than k (torch would refuse): a plain sort of what there is.
            std_sort(&mut self.heap, desc);
        } else {
            sort_heap(&mut self.heap, desc);
        }
        self.heap
    }
}

#[cfg(test)]
mod tests {
    //! Expected orders were produced by torch 2.15 (CPU) on the same values.
    use super::*;

    const A: [i8; 40] = [
        4, -1, 3, -1, 4, 3, -3, -2, 2, -3, -3, -1, 4, 4, -4, 2, 2, 2, 1, 0, -1, 2, 2, -4, 4, 3, -3,
        -1, -2, -1, -4, 1, 4, -1, 3, -4, 0, 1, 1, 0,
    ];
    const B: [i8; 70] = [
        -3, 1, -4, -2, 1, 3, -2, 1, 3, -3, -1, 4, 4, 4, 1, 4, 3, -2, 4, 3, -1, -1, 3, 4, 1, 1, 3,
        2, -1, -1, 3, -3, -3, -3, 2, 4, 2, -3, 1, 2, -2, 1, 2, -4, -3, -3, 1, -4, 2, -3, 4, 0, -1,
        0, -2, 2, 2, -2, 4, 4, -1, -1, -3, 3, 4, -4, 3, 2, 2, -2,
    ];

    fn f(v: &[i8]) -> Vec<f32> {
        v.iter().map(|&x| f32::from(x)).collect()
    }

    fn sorted(v: &[f32]) -> Vec<usize> {
        let mut out = Vec::new();
        sort_ascending(v, &mut out);
        out.into_iter().map(|(_, i)| i).collect()
    }

    #[test]
    fn sort_matches_torch() {
        assert_eq!(
            sorted(&f(&A)),
            [
                35, 30, 23, 14, 6, 9, 10, 26, 28, 7, 1, 33, 29, 27, 20, 3, 11, 39, 19, 36, 38, 18,
                37, 31, 8, 15, 22, 21, 17, 16, 25, 5, 2, 34, 24, 4, 12, 32, 0, 13
            ]
        );
        assert_eq!(
            sorted(&f(&B)),
            [
                2, 65, 43, 47, 0, 37, 33, 32, 31, 44, 45, 49, 62, 9, 54, 3, 69, 6, 40, 17, 57, 10,
                20, 21, 60, 61, 28, 29, 52, 51, 53, 46, 41, 38, 1, 4, 7, 14, 25, 24, 36, 68, 67,
                56, 55, 48, 34, 42, 27, 39, 19, 22, 30, 16, 66, 5, 26, 63, 8, 35, 64, 11, 59, 58,
                12, 13, 15, 50, 18, 23
            ]
        );
        let c: Vec<f32> = (0..100).map(|i| ((i * 7919) % 5) as f32).collect();
        assert_eq!(
            sorted(&c),
            [
                0, 35, 30, 40, 45, 25, 50, 55, 20, 60, 65, 15, 70, 75, 10, 80, 95, 85, 90, 5, 34,
                74, 99, 39, 94, 44, 49, 89, 54, 59, 84, 64, 69, 79, 19, 24, 4, 9, 29, 14, 18, 13,
                63, 8, 78, 58, 73, 68, 83, 23, 53, 93, 33, 98, 38, 3, 43, 28, 88, 48, 92, 82, 7,
                77, 12, 2, 97, 72, 87, 32, 47, 67, 17, 62, 37, 52, 57, 42, 27, 22, 41, 6, 46, 91,
                51, 31, 96, 36, 1, 26, 86, 16, 56, 81, 11, 21, 61, 76, 66, 71
            ]
        );
    }

    #[test]
    fn topk_matches_torch() {
        assert_eq!(topk(&f(&A), 1), [4]);
        assert_eq!(topk(&f(&A), 3), [4, 24, 32]);
        assert_eq!(topk(&f(&A), 8), [4, 24, 32, 13, 0, 12, 34, 25]);
        assert_eq!(topk(&f(&B), 1), [11]);
        assert_eq!(topk(&f(&B), 3), [11, 13, 15]);
        assert_eq!(topk(&f(&B), 8), [15, 58, 11, 13, 18, 23, 12, 50]);
        assert_eq!(topk(&f(&B), 100).len(), 70);
        assert!(topk(&f(&B), 0).is_empty());
    }

    #[test]
    fn streaming_topk_matches_torch_partial_sort() {
        let v: Vec<f32> = (0..640)
            .map(|i| ((i * 37 + 11) % 7) as f32 - 3.0 + if i % 13 == 0 { 0.5 } else { 0.0 })
            .collect();
        for (k, want) in [
            (8, vec![442, 351, 624, 533, 169, 260, 78, 15]),
            (10, vec![533, 351, 442, 624, 169, 260, 78, 43, 50, 8]),
        ] {
            assert_eq!(topk(&v, k), want);
            let mut s = StreamingTopK::new(k);
            v.iter().for_each(|&x| s.push(x));
            let got: Vec<usize> = s.finish().into_iter().map(|(_, i)| i).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn nan_sorts_last_ascending_and_first_in_topk() {
        let v = [1.0, f32::NAN, 0.0, f32::NAN, -1.0];
        assert_eq!(sorted(&v), [4, 2, 0, 1, 3]);
        assert_eq!(topk(&v, 2), [1, 3]);
    }

    #[test]
    fn heapsort_fallback_keeps_a_valid_sort() {
        // A long run of equal and sorted values; whatever path introsort takes, the result must
        // be sorted and a permutation.
        let v: Vec<f32> = (0..5000).map(|i| ((i / 3) % 97) as f32).collect();
        let order = sorted(&v);
        assert!(order.windows(2).all(|w| v[w[0]] <= v[w[1]]));
        let mut seen = order.clone();
        seen.sort_unstable();
        assert!(seen.iter().enumerate().all(|(i, &x)| i == x));
    }
}
