//! Calls that do not depend on each other, made from a few threads at once.

/// `call` on each item from up to `threads` threads at once (each takes a
/// run of consecutive items), results in the items' order. A panic on one
/// of the threads is a panic here.
pub fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    call: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if items.len() < 2 || threads < 2 {
        return items.iter().map(&call).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    let call = &call;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(per_thread)
            .map(|chunk| scope.spawn(move || chunk.iter().map(call).collect::<Vec<R>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(results) => results,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::in_parallel;

    #[test]
    fn results_come_back_in_the_items_order_from_several_threads() {
        let items: Vec<u32> = (0..37).collect();
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        let out = in_parallel(&items, 4, |x| {
            threads.lock().unwrap().insert(std::thread::current().id());
            x * 2
        });
        assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!(threads.lock().unwrap().len(), 4);
        assert_eq!(in_parallel(&[7u32], 4, |x| x + 1), vec![8]);
        assert_eq!(in_parallel(&[] as &[u32], 4, |x| x + 1), Vec::<u32>::new());
    }

    #[test]
    #[should_panic(expected = "item 5")]
    fn a_panic_on_a_thread_reaches_the_caller() {
        let items: Vec<u32> = (0..8).collect();
        in_parallel(&items, 4, |x| assert_ne!(*x, 5, "item 5"));
    }
}
