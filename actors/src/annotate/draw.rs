//! Drawing on a packed RGB picture: box outlines, thick lines, polygons and text (DejaVu Sans
//! Bold through ab_glyph; the font's licence, Bitstream Vera's, allows bundling it, and it is
//! in actors/assets/ beside the font).

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};

static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans-Bold.ttf");

/// The bundled font, parsed once for every label of every frame.
fn font() -> &'static FontRef<'static> {
    static FONT: std::sync::OnceLock<FontRef<'static>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("the bundled font parses"))
}

pub type Rgb = [u8; 3];

/// A packed RGB picture to draw on.
pub struct Canvas<'a> {
    pixels: &'a mut [u8],
    width: usize,
    height: usize,
}

impl<'a> Canvas<'a> {
    /// `pixels` holds `width x height` RGB pixels, row after row.
    pub fn new(pixels: &'a mut [u8], width: usize, height: usize) -> Canvas<'a> {
        assert_eq!(pixels.len(), width * height * 3, "a canvas is width x height RGB pixels");
        Canvas { pixels, width, height }
    }

    /// Blends `color` into one pixel with `alpha` (0 to 1); pixels off the picture are skipped.
    fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let at = (y as usize * self.width + x as usize) * 3;
        for (channel, value) in self.pixels[at..at + 3].iter_mut().zip(color) {
            *channel = (f32::from(*channel) * (1.0 - alpha) + f32::from(value) * alpha).round() as u8;
        }
    }

    /// A filled rectangle, corners included, clipped to the picture.
    pub fn fill(&mut self, x1: i64, y1: i64, x2: i64, y2: i64, color: Rgb, alpha: f32) {
        for y in y1.max(0)..=y2.min(self.height as i64 - 1) {
            for x in x1.max(0)..=x2.min(self.width as i64 - 1) {
                self.blend(x, y, color, alpha);
            }
        }
    }

    /// A rectangle's outline, `thickness` pixels wide inside `[x1, y1, x2, y2]`.
    pub fn outline(&mut self, [x1, y1, x2, y2]: [f32; 4], thickness: i64, color: Rgb) {
        let (x1, y1, x2, y2) = (x1.round() as i64, y1.round() as i64, x2.round() as i64, y2.round() as i64);
        let t = thickness - 1;
        self.fill(x1, y1, x2, y1 + t, color, 1.0);
        self.fill(x1, y2 - t, x2, y2, color, 1.0);
        self.fill(x1, y1, x1 + t, y2, color, 1.0);
        self.fill(x2 - t, y1, x2, y2, color, 1.0);
    }

    /// A straight line from `a` to `b`, `thickness` pixels wide.
    pub fn line(&mut self, a: (f32, f32), b: (f32, f32), thickness: i64, color: Rgb) {
        let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as i64;
        let half = thickness / 2;
        for i in 0..=steps {
            let t = i as f32 / steps as f32;
            let (x, y) = ((a.0 + (b.0 - a.0) * t).round() as i64, (a.1 + (b.1 - a.1) * t).round() as i64);
            self.fill(x - half, y - half, x - half + thickness - 1, y - half + thickness - 1, color, 1.0);
        }
    }

    /// A closed polygon's outline.
    pub fn polygon(&mut self, points: &[(f32, f32)], thickness: i64, color: Rgb) {
        for (i, &a) in points.iter().enumerate() {
            self.line(a, points[(i + 1) % points.len()], thickness, color);
        }
    }

    /// `text` on a filled label whose top-left corner is at (x, y), for text `size` pixels high;
    /// kept inside the picture. Returns the label's width.
    pub fn label(&mut self, x: f32, y: f32, size: f32, text: &str, background: Rgb, foreground: Rgb) -> f32 {
        let font = font();
        let scaled = font.as_scaled(PxScale::from(size));
        let width: f32 = text.chars().map(|c| scaled.h_advance(font.glyph_id(c))).sum::<f32>() + 6.0;
        let height = label_height(size);
        let x = x.clamp(0.0, (self.width as f32 - width).max(0.0));
        let y = y.clamp(0.0, (self.height as f32 - height).max(0.0));
        self.fill(x as i64, y as i64, (x + width) as i64, (y + height) as i64, background, 1.0);
        let mut pen = x + 3.0;
        let baseline = y + 2.0 + scaled.ascent();
        for c in text.chars() {
            let glyph = font.glyph_id(c).with_scale_and_position(PxScale::from(size), ab_glyph::point(pen, baseline));
            pen += scaled.h_advance(glyph.id);
            if let Some(outlined) = font.outline_glyph(glyph) {
                let bounds = outlined.px_bounds();
                outlined.draw(|gx, gy, coverage| {
                    self.blend(bounds.min.x as i64 + i64::from(gx), bounds.min.y as i64 + i64::from(gy), foreground, coverage.min(1.0));
                });
            }
        }
        width
    }
}

/// The height of a label for text `size` pixels high.
pub fn label_height(size: f32) -> f32 {
    let scaled = font().as_scaled(PxScale::from(size));
    scaled.ascent() - scaled.descent() + 4.0
}

/// A colour of its own for each track id: hues spread by the golden angle, so that ids in a row
/// differ.
pub fn track_color(id: u64) -> Rgb {
    let hue = (id as f64 * 137.507_764) % 360.0;
    hsv(hue, 0.85, 0.95)
}

fn hsv(hue: f64, saturation: f64, value: f64) -> Rgb {
    let c = value * saturation;
    let x = c * (1.0 - ((hue / 60.0) % 2.0 - 1.0).abs());
    let m = value - c;
    let (r, g, b) = match hue as u32 / 60 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    [r, g, b].map(|v| ((v + m) * 255.0).round() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outline_is_drawn_where_it_is_asked_and_nowhere_else() {
        let mut pixels = vec![0u8; 20 * 10 * 3];
        let mut canvas = Canvas::new(&mut pixels, 20, 10);
        canvas.outline([2.0, 3.0, 8.0, 7.0], 1, [255, 0, 0]);
        let at = |x: usize, y: usize| pixels[(y * 20 + x) * 3];
        assert_eq!((at(2, 3), at(8, 7), at(5, 3), at(2, 5)), (255, 255, 255, 255));
        assert_eq!((at(5, 5), at(1, 3), at(9, 7), at(5, 8)), (0, 0, 0, 0));
    }

    #[test]
    fn text_leaves_ink_inside_its_label_and_lines_clip_at_the_edges() {
        let mut pixels = vec![0u8; 120 * 40 * 3];
        let mut canvas = Canvas::new(&mut pixels, 120, 40);
        let width = canvas.label(500.0, 5.0, 16.0, "cat #1", [0, 0, 0], [255, 255, 255]);
        assert!(width > 30.0 && width < 120.0, "{width}");
        canvas.line((-50.0, 20.0), (500.0, 20.0), 3, [0, 255, 0]);
        let ink = pixels.chunks(3).filter(|p| p[0] == 255 && p[2] == 255).count();
        assert!(ink > 20, "the text is drawn: {ink} white pixels");
        assert_eq!(pixels[(20 * 120 + 119) * 3 + 1], 255, "the line reaches the right edge");
    }

    #[test]
    fn neighbouring_ids_get_different_colours() {
        assert_ne!(track_color(1), track_color(2));
        assert_eq!(track_color(7), track_color(7));
    }
}
