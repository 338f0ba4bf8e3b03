//! Where an execution's time went, from its ExecutedActionMetadata: queue,
//! input fetch, VM start (reported by the runner, inside the execution
//! span), run, output upload.

use std::time::Duration;

use hearth_scheduler::ExecutionRecord;
use maud::{html, Markup};

use crate::layout;

/// The phases of one execution; any may be unknown (a cache hit has none).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Phases {
    pub queue: Option<Duration>,
    pub fetch: Option<Duration>,
    pub vm_start: Option<Duration>,
    pub run: Option<Duration>,
    pub upload: Option<Duration>,
}

impl Phases {
    pub(crate) fn of(r: &ExecutionRecord) -> Phases {
        let stages = r.stages();
        let vm_start = r
            .runner_start()
            .map(|s| Duration::from_millis(s.ready_millis));
        Phases {
            queue: stages.queued,
            fetch: stages.input_fetch,
            vm_start,
            run: stages
                .execution
                .map(|e| e.saturating_sub(vm_start.unwrap_or_default())),
            upload: stages.output_upload,
        }
    }

    fn parts(&self) -> [(&'static str, &'static str, Option<Duration>); 5] {
        [
            ("s-queue", "queue", self.queue),
            ("s-fetch", "input fetch", self.fetch),
            ("s-vm", "VM start", self.vm_start),
            ("s-run", "run", self.run),
            ("s-upload", "upload", self.upload),
        ]
    }

    pub(crate) fn total(&self) -> Duration {
        self.parts().iter().filter_map(|(_, _, d)| *d).sum()
    }

    /// A bar of the phases, each as wide as its share of the whole.
    pub(crate) fn bar(&self) -> Markup {
        let total = self.total().as_secs_f64();
        html! {
            div.bar {
                @if total > 0.0 {
                    @for (class, name, d) in self.parts() {
                        @if let Some(d) = d {
                            @let pct = d.as_secs_f64() / total * 100.0;
                            @if pct >= 0.5 {
                                span class=(class)
                                    style=(format!("width:{pct:.1}%"))
                                    title=(format!("{name}: {}", layout::duration(d))) {}
                            }
                        }
                    }
                }
            }
        }
    }

    /// The phases as a table body.
    pub(crate) fn rows(&self) -> Markup {
        html! {
            @for (class, name, d) in self.parts() {
                tr {
                    th { span.legend { span class=(class) {} } (name) }
                    td.num { @match d { Some(d) => (layout::duration(d)), None => span.muted { "—" } } }
                }
            }
        }
    }
}

/// The colour key of the bar.
pub(crate) fn legend() -> Markup {
    html! {
        p.legend.muted {
            @for (class, name) in [("s-queue", "queue"), ("s-fetch", "input fetch"), ("s-vm", "VM start"), ("s-run", "run"), ("s-upload", "upload")] {
                span class=(class) {} (name)
            }
        }
    }
}
