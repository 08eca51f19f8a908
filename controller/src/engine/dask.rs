//! The Dask engine: the master runs the scheduler (and a worker with the
//! master's worker count), each slave runs `dask worker` with `--nworkers
//! <workers>` pointed at the scheduler. Installed with pip into the node's
//! virtualenv. A slave that is leaving gets no worker directive: its agent
//! stops the worker with SIGTERM, which retires it gracefully.

use super::{Directive, DirectiveKind, Engine, Member, master};
use crate::model::Role;
use crate::plan::{NodeLayout, Step, StepKind};
use std::collections::BTreeMap;

pub struct Dask {
    pub version: String,
    pub scheduler_port: u16,
    pub dashboard_port: u16,
}

impl Dask {
    pub fn from_config(cfg: &crate::config::Config) -> Dask {
        Dask {
            version: cfg.dask.version.clone(),
            scheduler_port: cfg.dask.scheduler_port,
            dashboard_port: cfg.dask.dashboard_port,
        }
    }

    fn dask(layout: &NodeLayout) -> String {
        layout.venv.join("bin/dask").display().to_string()
    }

    fn worker(&self, me: &Member, scheduler: &str, layout: &NodeLayout) -> Directive {
        let local_dir = match &layout.scratch {
            Some(s) => s.join("dask-worker").display().to_string(),
            None => super::under(layout, "var/dask-worker"),
        };
        let argv = [
            Dask::dask(layout).as_str(),
            "worker",
            scheduler,
            "--nworkers",
            &me.workers.max(1).to_string(),
            "--nthreads",
            "1",
            "--host",
            &me.address,
            "--name",
            &me.id,
            "--no-dashboard",
            "--local-directory",
            &local_dir,
        ]
        .map(String::from)
        .to_vec();
        Directive {
            name: "dask-worker".into(),
            kind: DirectiveKind::Service {
                argv,
                env: BTreeMap::new(),
                workdir: String::new(),
                grace_ms: 20_000,
            },
        }
    }
}

impl Engine for Dask {
    fn name(&self) -> &'static str {
        "dask"
    }

    fn steps(&self, _role: Role, _workers: u32, layout: &NodeLayout) -> Vec<Step> {
        vec![Step {
            name: "dask_install".into(),
            kind: StepKind::Pip {
                requirements: vec![format!("dask[distributed]=={}", self.version)],
                venv: layout.venv.display().to_string(),
            },
        }]
    }

    fn directives(&self, me: &Member, members: &[Member], layout: &NodeLayout) -> Vec<Directive> {
        if me.leaving || me.address.is_empty() {
            return vec![];
        }
        let mut out = Vec::new();
        if me.is_master() {
            let argv = [
                Dask::dask(layout).as_str(),
                "scheduler",
                "--host",
                &me.address,
                "--port",
                &self.scheduler_port.to_string(),
                "--dashboard-address",
                &format!("{}:{}", me.address, self.dashboard_port),
            ]
            .map(String::from)
            .to_vec();
            out.push(Directive {
                name: "dask-scheduler".into(),
                kind: DirectiveKind::Service {
                    argv,
                    env: BTreeMap::new(),
                    workdir: String::new(),
                    grace_ms: 5_000,
                },
            });
            let scheduler = format!("tcp://{}:{}", me.address, self.scheduler_port);
            out.push(self.worker(me, &scheduler, layout));
        } else if let Some(m) = master(members) {
            // Slaves wait for a ready master.
            let scheduler = format!("tcp://{}:{}", m.address, self.scheduler_port);
            out.push(self.worker(me, &scheduler, layout));
        }
        out
    }

    /// A node's directives depend on itself and the master only.
    fn partial(&self) -> bool {
        true
    }

    /// A slave's directives depend only on the scheduler's address.
    fn shared_key(&self, members: &[Member]) -> String {
        master(members).map(|m| m.address.clone()).unwrap_or_default()
    }

    fn endpoints(&self, members: &[Member]) -> BTreeMap<String, String> {
        let mut e = BTreeMap::new();
        if let Some(m) = master(members) {
            e.insert("scheduler".into(), format!("tcp://{}:{}", m.address, self.scheduler_port));
            e.insert("dashboard".into(), format!("http://{}:{}/status", m.address, self.dashboard_port));
        }
        e
    }

    fn lines(&self, members: &[Member]) -> Vec<String> {
        match master(members) {
            None => vec!["Dask: waiting for a ready master".into()],
            Some(m) => vec![
                format!("Dask scheduler: tcp://{}:{}", m.address, self.scheduler_port),
                format!(
                    "Dask dashboard: http://{}:{}/status (remote: ssh -L {p}:{}:{p} <master>, then http://localhost:{p}/status)",
                    m.address,
                    self.dashboard_port,
                    m.address,
                    p = self.dashboard_port
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> NodeLayout {
        NodeLayout {
            root: "/n".into(),
            home: "/n/home".into(),
            owner: None,
            venv: "/n/venv".into(),
            install_packages: false,
            system: false,
            scratch: None,
        }
    }

    fn member(id: &str, role: Role, addr: &str, workers: u32) -> Member {
        Member {
            id: id.into(),
            role: Some(role),
            address: addr.into(),
            hostname: id.into(),
            workers,
            ready: true,
            ..Default::default()
        }
    }

    fn dask() -> Dask {
        Dask { version: crate::config::DASK_VERSION.into(), scheduler_port: 8786, dashboard_port: 8787 }
    }

    fn argv(d: &Directive) -> &Vec<String> {
        match &d.kind {
            DirectiveKind::Service { argv, .. } => argv,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn master_runs_scheduler_and_worker_slaves_follow_the_master() {
        let m = member("master-0001", Role::Master, "10.0.0.1", 4);
        let s = member("slave-0002", Role::Slave, "10.0.0.2", 3);
        let all = [m.clone(), s.clone()];
        let d = dask().directives(&m, &all, &layout());
        assert_eq!(d.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["dask-scheduler", "dask-worker"]);
        assert!(argv(&d[0]).contains(&"10.0.0.1".to_string()));
        let d = dask().directives(&s, &all, &layout());
        let a = argv(&d[0]);
        assert_eq!(a[2], "tcp://10.0.0.1:8786");
        assert_eq!(a[a.iter().position(|x| x == "--nworkers").unwrap() + 1], "3");
    }

    #[test]
    fn slaves_wait_for_a_ready_master_and_leaving_slaves_stop() {
        let mut m = member("m", Role::Master, "10.0.0.1", 1);
        m.ready = false;
        let s = member("s", Role::Slave, "10.0.0.2", 1);
        assert!(dask().directives(&s, &[m.clone(), s.clone()], &layout()).is_empty());
        m.ready = true;
        let mut leaving = s.clone();
        leaving.leaving = true;
        assert!(dask().directives(&leaving, &[m.clone(), leaving.clone()], &layout()).is_empty());
        assert_eq!(dask().endpoints(&[m])["scheduler"], "tcp://10.0.0.1:8786");
    }

    #[test]
    fn install_step_pins_the_version() {
        let steps = dask().steps(Role::Slave, 1, &layout());
        match &steps[0].kind {
            StepKind::Pip { requirements, venv } => {
                assert_eq!(
                    requirements,
                    &vec![format!("dask[distributed]=={}", crate::config::DASK_VERSION)]
                );
                assert_eq!(venv, "/n/venv");
            }
            other => panic!("{other:?}"),
        }
    }
}
