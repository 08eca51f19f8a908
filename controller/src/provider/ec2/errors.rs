//! How EC2 errors are handled: each code sorted into capacity, throttling,
//! a configuration key, or other; and the code and message of an SDK error.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

/// How an EC2 error is handled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Capacity,
    /// An account quota (running vCPUs, instances, spot instances): every
    /// type and zone would say the same, so the request shrinks and then
    /// the market waits; no type cools down.
    Quota,
    Throttled,
    /// A config key is wrong.
    Config(&'static str),
    Other,
}

/// Sorts an EC2 error into the handling it needs, using the message where
/// the code alone does not say which setting is wrong.
pub(super) fn classify_error(code: &str, msg: &str) -> Kind {
    if code == "NoSuchEntity" || (code == "InvalidParameterValue" && msg.contains("iamInstanceProfile")) {
        return Kind::Config("iam_instance_profile");
    }
    classify(code)
}

/// Sorts EC2 error codes into the handling they need.
pub(super) fn classify(code: &str) -> Kind {
    match code {
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "SpotMaxPriceTooLow"
        | "Unsupported"
        | "InsufficientFreeAddressesInSubnet" => Kind::Capacity,
        "MaxSpotInstanceCountExceeded" | "InstanceLimitExceeded" | "VcpuLimitExceeded" => Kind::Quota,
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled" => Kind::Throttled,
        c if c.starts_with("InvalidAMIID") => Kind::Config("ami"),
        c if c.starts_with("InvalidKeyPair") => Kind::Config("key_name"),
        c if c.starts_with("InvalidGroup") => Kind::Config("security_groups"),
        c if c.starts_with("InvalidSubnet") => Kind::Config("subnet_ids"),
        c if c.starts_with("InvalidInstanceType") => Kind::Config("instance_type"),
        "UnauthorizedOperation" => Kind::Config("permissions"),
        "AuthFailure" | "OptInRequired" | "Blocked" => Kind::Config("credentials"),
        _ => Kind::Other,
    }
}

pub(super) fn describe<E: ProvideErrorMetadata + std::fmt::Debug>(e: &SdkError<E>) -> (String, String) {
    let code = e.code().unwrap_or("").to_string();
    let msg = match e.message() {
        Some(m) => m.to_string(),
        None => match e {
            SdkError::DispatchFailure(d) => format!("cannot reach the EC2 endpoint: {d:?}"),
            SdkError::TimeoutError(_) => "EC2 call timed out".into(),
            other => format!("{other:?}"),
        },
    };
    (code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn error_codes_map_to_handling() {
        assert_eq!(classify("InsufficientInstanceCapacity"), Kind::Capacity);
        assert_eq!(classify("SpotMaxPriceTooLow"), Kind::Capacity);
        assert_eq!(classify("VcpuLimitExceeded"), Kind::Quota);
        assert_eq!(classify("MaxSpotInstanceCountExceeded"), Kind::Quota);
        assert_eq!(classify("RequestLimitExceeded"), Kind::Throttled);
        assert_eq!(classify("InvalidAMIID.NotFound"), Kind::Config("ami"));
        assert_eq!(classify("InvalidAMIID.Malformed"), Kind::Config("ami"));
        assert_eq!(classify("InvalidKeyPair.NotFound"), Kind::Config("key_name"));
        assert_eq!(classify("InvalidGroup.NotFound"), Kind::Config("security_groups"));
        assert_eq!(classify("InvalidInstanceType"), Kind::Config("instance_type"));
        assert_eq!(classify("AuthFailure"), Kind::Config("credentials"));
        assert_eq!(classify("UnauthorizedOperation"), Kind::Config("permissions"));
        let m = missing_permission("RunInstances", Some("ddisco-nodes"));
        assert!(
            m.contains("ec2:RunInstances") && m.contains("iam:PassRole") && m.contains("ddisco-nodes"),
            "{m}"
        );
        assert_eq!(classify("InternalError"), Kind::Other);
        let bad_profile =
            "Value (x) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name";
        assert_eq!(
            classify_error("InvalidParameterValue", bad_profile),
            Kind::Config("iam_instance_profile")
        );
        assert_eq!(classify_error("InvalidParameterValue", "other"), Kind::Other);
    }
}

/// What an `UnauthorizedOperation` on `action` means: which permissions the
/// AWS identity needs for it (with an instance profile, `iam:PassRole` on its
/// role), and how to read AWS's encoded reason.
pub fn missing_permission(action: &str, instance_profile: Option<&str>) -> String {
    let mut needs = vec![format!("ec2:{action}")];
    if action == "RunInstances" {
        needs.push("ec2:CreateTags (tags at launch)".into());
        if let Some(p) = instance_profile {
            needs.push(format!("iam:PassRole on the role of instance profile {p} (iam_instance_profile)"));
        }
    }
    format!(
        "the AWS identity the controller runs as is not allowed to call {action}: it needs {}. AWS's encoded \
         reason (in the message) is readable with `aws sts decode-authorization-message --encoded-message ...`",
        needs.join(", ")
    )
}

/// The instance ids of `sent` that an `InvalidInstanceID.NotFound` message
/// names ("The instance ID 'i-1' does not exist", "The instance IDs 'i-1,
/// i-2' do not exist").
pub fn unknown_instance_ids(message: &str, sent: &[String]) -> Vec<String> {
    sent.iter().filter(|id| message.contains(id.as_str())).cloned().collect()
}

#[cfg(test)]
mod unknown_ids_tests {
    use super::*;

    #[test]
    fn the_ids_a_not_found_message_names_are_found() {
        let sent: Vec<String> = ["i-0aaa", "i-0bbb", "i-0ccc"].map(String::from).to_vec();
        assert_eq!(unknown_instance_ids("The instance ID 'i-0bbb' does not exist", &sent), ["i-0bbb"]);
        assert_eq!(
            unknown_instance_ids("The instance IDs 'i-0aaa, i-0ccc' do not exist", &sent),
            ["i-0aaa", "i-0ccc"]
        );
        assert!(unknown_instance_ids("something else", &sent).is_empty());
    }
}

/// What a quota error says: the account's limit and how many more
/// instances it allows, where the message gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaError {
    pub code: String,
    /// "... your current vCPU limit of 32 ...", "... instance limit of 20 ...".
    pub limit: Option<u32>,
    /// "Your quota allows for 2 more running instance(s)".
    pub room: Option<u32>,
}

/// Reads the numbers of a quota error's message.
pub fn quota_error(code: &str, message: &str) -> QuotaError {
    let number_after = |marker: &str| {
        let rest = &message[message.find(marker)? + marker.len()..];
        let digits: String = rest.trim_start().chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    QuotaError { code: code.to_string(), limit: number_after("limit of"), room: number_after("allows for") }
}

impl QuotaError {
    /// How many to ask for next after asking `asked`: what the message says
    /// still fits, else half; `None` when not even one fits.
    pub fn shrink(&self, asked: usize) -> Option<usize> {
        let next = match self.room {
            Some(r) => (r as usize).min(asked.saturating_sub(1)),
            None => asked / 2,
        };
        (next >= 1).then_some(next)
    }

    /// The quota in words, with its numbers.
    pub fn describe(&self, spot: bool) -> String {
        let market = if spot { "spot" } else { "on-demand" };
        let what = match (self.code.as_str(), self.limit) {
            ("VcpuLimitExceeded", Some(l)) => {
                format!("the account's {market} vCPU quota ({l} vCPUs) is used up")
            }
            ("VcpuLimitExceeded", None) => format!("the account's {market} vCPU quota is used up"),
            ("InstanceLimitExceeded", Some(l)) => {
                format!("the account's instance quota ({l} instances) is used up")
            }
            ("MaxSpotInstanceCountExceeded", _) => {
                "the account's spot instance count quota is used up".into()
            }
            (_, Some(l)) => format!("an account quota (limit {l}) is used up"),
            _ => "an account quota is used up".into(),
        };
        format!("{}: {what}; ask AWS to raise it (Service Quotas, EC2), or scale down", self.code)
    }
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    #[test]
    fn quota_messages_give_their_numbers_and_the_request_shrinks() {
        let v = quota_error(
            "VcpuLimitExceeded",
            "You have requested more vCPU capacity than your current vCPU limit of 32 allows for the instance \
             bucket that the specified instance type belongs to.",
        );
        assert_eq!((v.limit, v.room), (Some(32), None));
        assert!(v.describe(true).contains("spot vCPU quota (32 vCPUs)"), "{}", v.describe(true));
        assert_eq!(v.shrink(8), Some(4));
        assert_eq!(v.shrink(1), None);
        let i = quota_error(
            "InstanceLimitExceeded",
            "Your quota allows for 2 more running instance(s). You requested at least 5",
        );
        assert_eq!((i.limit, i.room), (None, Some(2)));
        assert_eq!(i.shrink(5), Some(2));
        let none = quota_error("InstanceLimitExceeded", "Your quota allows for 0 more running instance(s).");
        assert_eq!(none.shrink(5), None);
        let s = quota_error("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded");
        assert_eq!((s.limit, s.room), (None, None));
        assert_eq!(s.shrink(3), Some(1));
    }
}
