//! Pause points: named places between the read that decides and the write
//! that acts, where a test can hold one request while another runs, to force
//! an interleaving deterministically (instead of hoping a sleep lands it).
//!
//! Unarmed (always, outside such a test) a point costs one relaxed atomic
//! load. Armed, the first request to reach the named point waits there until
//! the test releases it; every later one passes.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::{Notify, oneshot};

static ARMED: AtomicBool = AtomicBool::new(false);

struct Gate {
    point: &'static str,
    reached: oneshot::Sender<()>,
    release: Arc<Notify>,
}

static GATE: Mutex<Option<Gate>> = Mutex::new(None);

/// Marks a pause point.
pub async fn point(name: &'static str) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    let release = {
        let mut gate = GATE.lock().unwrap_or_else(|p| p.into_inner());
        match gate.take_if(|g| g.point == name) {
            Some(g) => {
                ARMED.store(false, Ordering::Relaxed);
                let _ = g.reached.send(());
                g.release
            }
            None => return,
        }
    };
    release.notified().await;
}

/// A request held at a pause point.
pub struct Held {
    reached: Option<oneshot::Receiver<()>>,
    release: Arc<Notify>,
}

/// Arms `point`: the next request to reach it waits for [`Held::release`].
pub fn hold(point: &'static str) -> Held {
    let (reached, rx) = oneshot::channel();
    let release = Arc::new(Notify::new());
    *GATE.lock().unwrap_or_else(|p| p.into_inner()) = Some(Gate {
        point,
        reached,
        release: release.clone(),
    });
    ARMED.store(true, Ordering::Relaxed);
    Held {
        reached: Some(rx),
        release,
    }
}

impl Held {
    /// Waits until a request is held at the point.
    pub async fn reached(&mut self) {
        if let Some(rx) = self.reached.take() {
            rx.await
                .expect("the pause point was disarmed before it was reached");
        }
    }

    /// Lets the held request go on.
    pub fn release(&self) {
        self.release.notify_one();
    }
}
