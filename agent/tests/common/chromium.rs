//! Opens a report in headless Chromium (Debian's package) the way a reader would, and reports
//! what the rendered page holds: how many SVG figures, how many broken images, and which resources
//! the page fetched (a self-contained report fetches none). Keeps a screenshot as an artifact.

use std::{path::Path, process::Command};

pub struct Rendered {
    pub svgs: u64,
    pub broken_images: u64,
    pub resources: Vec<String>,
}

fn chromium() -> &'static str {
    if Path::new("/usr/bin/chromium").exists() {
        "/usr/bin/chromium"
    } else {
        "chromium-browser"
    }
}

/// Loads `html` inside a wrapper page whose script inspects it after load (file:// pages may read
/// each other with --allow-file-access-from-files), and dumps the verdict into the DOM.
pub fn render(html: &Path, screenshot: &Path) -> Rendered {
    let html = html.canonicalize().expect("report path");
    let dir = html.parent().unwrap();
    let wrapper = dir.join(".chromium-check.html");
    std::fs::write(
        &wrapper,
        format!(
            r#"<!DOCTYPE html><html><body><iframe id="r" src="{}" style="width:1200px;height:800px"></iframe><script>
document.getElementById('r').addEventListener('load', () => {{
  const w = document.getElementById('r').contentWindow;
  const resources = w.performance.getEntriesByType('resource').map(e => e.name);
  const svgs = w.document.querySelectorAll('svg').length;
  const broken = [...w.document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute('data-result', btoa(JSON.stringify({{resources, svgs, broken}})));
}});
</script></body></html>"#,
            html.file_name().unwrap().to_string_lossy()
        ),
    )
    .unwrap();
    let base = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
    ];
    let out = Command::new(chromium())
        .args(base)
        .arg("--dump-dom")
        .arg(format!("file://{}", wrapper.display()))
        .output()
        .expect("chromium (cargo xtask setup installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    let b64 = dom
        .split("data-result=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| {
            panic!(
                "the wrapper did not report; chromium stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let json = base64_decode(b64);
    let v: serde_json::Value = serde_json::from_slice(&json).expect("verdict json");
    let _ = std::fs::remove_file(&wrapper);
    if let Some(parent) = screenshot.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let shot = Command::new(chromium())
        .args(base)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg("--window-size=1280,3000")
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("chromium screenshot");
    assert!(
        screenshot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    Rendered {
        svgs: v["svgs"].as_u64().unwrap(),
        broken_images: v["broken"].as_u64().unwrap(),
        resources: v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap_or("").to_string())
            .collect(),
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = T.iter().position(|&t| t == c).expect("base64") as u32;
        buf = buf << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}
