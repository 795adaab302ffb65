//! Running batches on several workers (engines, or several threads per engine) at once: all pull
//! from one queue, results come back in batch order, and the first error (in batch order) wins.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Result;

/// Run `work(worker, item)` on every item, spreading items over `workers` (one thread each; the
/// first runs on the calling thread when there is only one worker or item). Returns the results
/// in item order. After an error no worker takes a new item, and the error of the earliest failed
/// item is returned.
pub fn run_in_order<W: Sync, I: Sync, T: Send>(
    workers: &[W],
    items: &[I],
    work: impl Fn(&W, &I) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let Some(first) = workers.first() else {
        anyhow::bail!("no worker to run {} items on", items.len());
    };
    if workers.len() == 1 || items.len() <= 1 {
        return items.iter().map(|i| work(first, i)).collect();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<T>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for worker in workers {
            let (next, failed, results, work) = (&next, &failed, &results, &work);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = work(worker, &items[i]);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    // The first error in item order wins; without one, every item has its result.
    let results = results.into_inner().unwrap();
    let failed_at = results.iter().position(|r| matches!(r, Some(Err(_))));
    let mut results = results.into_iter();
    if let Some(i) = failed_at {
        if let Some(Some(Err(e))) = results.nth(i) {
            return Err(e);
        }
    }
    results
        .map(|r| r.expect("every item ran: no worker failed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_in_order_and_the_first_error_wins() {
        let items: Vec<usize> = (0..100).collect();
        let workers = [1usize, 2, 3];
        let got = run_in_order(&workers, &items, |_, i| Ok(i * 2)).unwrap();
        assert_eq!(got, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let e = run_in_order(&workers, &items, |_, &i| {
            if i == 40 || i == 70 {
                anyhow::bail!("item {i}")
            }
            Ok(i)
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "item 40");
        assert!(run_in_order(&[] as &[usize], &items, |_, &i| Ok(i)).is_err());
    }
}
