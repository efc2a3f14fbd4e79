//! The Rust error table agrees with the contract's `otherix.v1.ErrorCode`
//! enum, value by value: one source of truth, checked.

use otherix_errors::ErrorCode;
use prost_reflect::{DescriptorPool, Value};

struct Spec {
    name: String,
    grpc_code: i32,
    http_status: u16,
}

fn contract_codes() -> Vec<(String, Spec)> {
    let pool = DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let ext = pool.get_extension_by_name("otherix.v1.error_code_spec").expect("error_code_spec option");
    let en = pool.get_enum_by_name("otherix.v1.ErrorCode").expect("otherix.v1.ErrorCode");
    let mut out = Vec::new();
    for v in en.values() {
        if v.number() == 0 {
            continue;
        }
        let opts = v.options();
        assert!(opts.has_extension(&ext), "{} has no error_code_spec", v.name());
        let Value::Message(spec) = opts.get_extension(&ext).into_owned() else { panic!("{}: not a message", v.name()) };
        let get = |f: &str| spec.get_field_by_name(f).expect(f).into_owned();
        let name = get("name").as_str().expect("name").to_owned();
        let grpc_code = get("grpc_code").as_enum_number().expect("grpc_code");
        let http_status = u16::try_from(get("http_status").as_i32().expect("http_status")).expect("http status");
        out.push((v.name().to_owned(), Spec { name, grpc_code, http_status }));
    }
    out
}

#[test]
fn rust_table_matches_the_contract_enum() {
    let contract = contract_codes();
    assert_eq!(contract.len(), ErrorCode::ALL.len(), "the proto enum and the Rust table list different codes");
    for (value_name, spec) in &contract {
        let code = ErrorCode::from_name(&spec.name)
            .unwrap_or_else(|| panic!("{value_name} ({}) is not in the Rust table", spec.name));
        assert_eq!(*value_name, format!("ERROR_CODE_{}", spec.name.to_uppercase()), "value name of {}", spec.name);
        assert_eq!(code.grpc_code() as i32, spec.grpc_code, "gRPC code of {}", spec.name);
        assert_eq!(code.http_status().as_u16(), spec.http_status, "HTTP status of {}", spec.name);
    }
    for code in ErrorCode::ALL {
        assert!(
            contract.iter().any(|(_, s)| s.name == code.as_str()),
            "{} is missing from errors.proto",
            code.as_str()
        );
    }
}

#[test]
fn generated_enum_names_every_code() {
    // The prost-generated enum is what Rust clients see; its names match too.
    for code in ErrorCode::ALL {
        let v = otherix_proto::otherix::v1::ErrorCode::from_str_name(&format!(
            "ERROR_CODE_{}",
            code.as_str().to_uppercase()
        ));
        assert!(v.is_some(), "{} not generated", code.as_str());
    }
}
