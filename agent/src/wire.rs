//! Every conversion between the generated protobuf types (`api`) and the
//! agent's domain types (`model`), in both directions.
//!
//! **API Boundary:** `api::*` types appear only here and in the modules
//! that call gRPC (`session`, `identity`). A field missing on the wire (a
//! step or directive without a kind: a newer controller) becomes an
//! explicit `Unknown`, never a panic.

use crate::model::*;
use ddisco_proto::v1 as api;

// ---- controller -> agent ----

impl From<api::ControllerMessage> for Inbound {
    fn from(m: api::ControllerMessage) -> Inbound {
        use api::controller_message::Msg;
        match m.msg {
            Some(Msg::Assignment(a)) => Inbound::Assignment(a.into()),
            Some(Msg::Directives(d)) => Inbound::Directives(d.into()),
            Some(Msg::Shutdown(s)) => Inbound::Shutdown(s.reason),
            Some(Msg::RenewCertificate(_)) => Inbound::RenewCertificate,
            Some(Msg::NewCertificate(c)) => Inbound::NewCertificate(c.certificate_pem),
            None => Inbound::Unknown,
        }
    }
}

impl From<api::Assignment> for Assignment {
    fn from(a: api::Assignment) -> Assignment {
        Assignment {
            node_id: a.node_id,
            role: match api::Role::try_from(a.role) {
                Ok(api::Role::Master) => Role::Master,
                Ok(api::Role::Slave) => Role::Slave,
                _ => Role::Unknown,
            },
            workers: a.workers,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            plan: a.plan.map(Plan::from),
        }
    }
}

impl From<api::Plan> for Plan {
    fn from(p: api::Plan) -> Plan {
        Plan { id: p.id, steps: p.steps.into_iter().map(Step::from).collect() }
    }
}

impl From<api::Step> for Step {
    fn from(s: api::Step) -> Step {
        use api::step::Kind;
        let kind = match s.kind {
            Some(Kind::SystemPackages(p)) => {
                StepKind::SystemPackages { packages: p.packages, install: p.install }
            }
            Some(Kind::Pip(p)) => StepKind::Pip { requirements: p.requirements, venv: p.venv },
            Some(Kind::AuthorizedKeys(k)) => {
                StepKind::AuthorizedKeys { path: k.path, keys: k.keys, owner: k.owner }
            }
            Some(Kind::Shell(sh)) => StepKind::Shell { script: sh.script, env: sh.env },
            Some(Kind::Scratch(sc)) => StepKind::Scratch(Scratch { path: sc.path, devices: sc.devices }),
            Some(Kind::Collect(c)) => StepKind::Collect { attribute: c.attribute, path: c.path },
            Some(Kind::PythonEnv(e)) => StepKind::PythonEnv(crate::model::PythonEnv {
                url: e.url,
                sha256: e.sha256,
                venv: e.venv,
                python: e.python,
                requirements: e.requirements,
                size: e.size,
                compiled: e.compiled,
            }),
            Some(Kind::Seal(seal)) => StepKind::Seal { image: seal.image, generalize: seal.generalize },
            None => StepKind::Unknown,
        };
        let image_digest = Some(s.image_digest).filter(|d| !d.is_empty());
        Step { name: s.name, kind, image_digest }
    }
}

impl From<api::Directives> for Directives {
    fn from(d: api::Directives) -> Directives {
        use api::directive::Kind;
        let items = d
            .items
            .into_iter()
            .map(|item| Directive {
                name: item.name,
                kind: match item.kind {
                    Some(Kind::Service(s)) => DirectiveKind::Service(Service {
                        argv: s.argv,
                        env: s.env,
                        workdir: s.workdir,
                        grace_ms: s.grace_ms,
                    }),
                    Some(Kind::File(f)) => DirectiveKind::File(ManagedFile {
                        path: f.path,
                        content: f.content,
                        mode: f.mode,
                        owner: f.owner,
                        marker: f.marker,
                    }),
                    Some(Kind::Post(p)) => {
                        DirectiveKind::Post(Post { url: p.url, body: p.body, content_type: p.content_type })
                    }
                    Some(Kind::Probe(p)) => DirectiveKind::Probe { url: p.url },
                    None => DirectiveKind::Unknown,
                },
            })
            .collect();
        Directives { id: d.id, items }
    }
}

// ---- agent -> controller ----

impl From<Facts> for api::NodeFacts {
    fn from(f: Facts) -> api::NodeFacts {
        api::NodeFacts {
            instance_id: f.instance_id,
            hostname: f.hostname,
            addresses: f.addresses,
            logical_cores: f.logical_cores,
            memory_bytes: f.memory_bytes,
            agent_version: f.agent_version,
            started_unix_ms: f.started_unix_ms,
            arch: f.arch,
        }
    }
}

fn msg(m: api::agent_message::Msg) -> api::AgentMessage {
    api::AgentMessage { msg: Some(m) }
}

/// The first message of a session: facts and the progress of a plan.
pub fn hello(facts: Facts, plan_id: String, completed_steps: u32) -> api::AgentMessage {
    msg(api::agent_message::Msg::Hello(api::Hello { facts: Some(facts.into()), plan_id, completed_steps }))
}

pub fn heartbeat(seq: u64, load_milli: Option<u32>) -> api::AgentMessage {
    msg(api::agent_message::Msg::Heartbeat(api::Heartbeat { seq, load_milli }))
}

impl From<Report> for api::AgentMessage {
    fn from(r: Report) -> api::AgentMessage {
        use api::agent_message::Msg;
        msg(match r {
            Report::Step(s) => Msg::Step(api::StepReport {
                plan_id: s.plan_id,
                index: s.index,
                name: s.name,
                status: match s.status {
                    StepStatus::Running => api::StepStatus::Running,
                    StepStatus::Succeeded => api::StepStatus::Succeeded,
                    StepStatus::Skipped => api::StepStatus::Skipped,
                    StepStatus::Failed => api::StepStatus::Failed,
                } as i32,
                duration_ms: s.duration_ms,
                exit_code: s.exit_code,
                output_tail: s.output_tail,
            }),
            Report::Attribute { name, value } => Msg::Attribute(api::Attribute { name, value }),
            Report::Probe { name, body } => Msg::Probe(api::ProbeResult { name, body }),
            Report::Notice { kind, detail } => Msg::Notice(api::Notice {
                kind: match kind {
                    NoticeKind::SpotInterruption => api::NoticeKind::SpotInterruption,
                    NoticeKind::Rebalance => api::NoticeKind::Rebalance,
                } as i32,
                detail,
            }),
            Report::Directive(d) => Msg::Directive(api::DirectiveReport {
                directives_id: d.directives_id,
                name: d.name,
                ok: d.ok,
                message: d.message,
            }),
        })
    }
}

/// The answer to a renewal request.
pub fn renew(csr_pem: String) -> api::AgentMessage {
    api::AgentMessage { msg: Some(api::agent_message::Msg::Renew(api::Renew { csr_pem })) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_or_directive_without_a_kind_is_unknown_not_a_panic() {
        let s = Step::from(api::Step { name: "x".into(), kind: None, image_digest: String::new() });
        assert_eq!(s.kind, StepKind::Unknown);
        let d = Directives::from(api::Directives {
            id: "i".into(),
            items: vec![api::Directive { name: "y".into(), kind: None }],
        });
        assert_eq!(d.items[0].kind, DirectiveKind::Unknown);
        assert_eq!(Inbound::from(api::ControllerMessage { msg: None }), Inbound::Unknown);
    }

    #[test]
    fn plans_and_reports_cross_the_wire() {
        let p = Plan::from(api::Plan {
            id: "p".into(),
            steps: vec![api::Step {
                name: "scratch".into(),
                kind: Some(api::step::Kind::Scratch(api::Scratch { path: "/mnt".into(), devices: vec![] })),
                image_digest: "d".into(),
            }],
        });
        assert_eq!(p.steps[0].kind, StepKind::Scratch(Scratch { path: "/mnt".into(), devices: vec![] }));
        assert_eq!(p.steps[0].image_digest.as_deref(), Some("d"));
        assert_eq!(Step::from(api::Step::default()).image_digest, None);
        let m = api::AgentMessage::from(Report::Step(StepReport {
            plan_id: "p".into(),
            index: 0,
            name: "scratch".into(),
            status: StepStatus::Failed,
            duration_ms: 3,
            exit_code: 2,
            output_tail: "no".into(),
        }));
        match m.msg {
            Some(api::agent_message::Msg::Step(s)) => {
                assert_eq!((s.status, s.exit_code), (api::StepStatus::Failed as i32, 2))
            }
            other => panic!("{other:?}"),
        }
    }
}
